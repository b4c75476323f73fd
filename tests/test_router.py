import torch

from moleflow.router import UNKNOWN, Prototype, TaskRouter, fit_prototype


def _clusters(n=60, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = [torch.zeros(d), torch.full((d,), 3.0), torch.linspace(-3, 3, d)]
    return [c + torch.randn(n, d, generator=g) for c in centres]


def test_mahalanobis_routing_batched():
    train = _clusters(seed=0)
    test = _clusters(seed=1)
    r = TaskRouter()
    for t, x in enumerate(train):
        r.add_task(t, x)
    for t, x in enumerate(test):
        assert (r.route(x) == t).all()
    assert r.distances(test[0]).shape == (60, 3)


def test_mahalanobis_uses_the_covariance():
    # Task 0 is wide along dim 0, task 1 narrow; a point far along dim 0 but near task 1's mean in
    # Euclidean terms belongs to task 0.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 2, generator=g) * torch.tensor([10.0, 0.1])
    b = torch.randn(500, 2, generator=g) * 0.1 + torch.tensor([6.0, 1.0])
    r = TaskRouter()
    r.add_task(0, a)
    r.add_task(1, b)
    x = torch.tensor([[6.0, 0.0]])
    assert (x - a.mean(0)).norm() > (x - b.mean(0)).norm()  # Euclidean says task 1
    assert int(r.route(x)[0]) == 0


def test_oracle_and_unknown():
    train = _clusters()
    r = TaskRouter(mode="oracle")
    assert (r.route(train[0], true_tasks=torch.full((60,), 2)) == 2).all()
    r = TaskRouter(unknown=True)
    for t, x in enumerate(train[:2]):
        r.add_task(t, x)
    assert (r.route(_clusters(seed=3)[0]) == 0).float().mean() > 0.9
    far = torch.full((5, 16), 50.0)
    assert (r.route(far) == UNKNOWN).all()


def test_hybrid_picks_lower_nll_among_top2():
    train = _clusters()
    r = TaskRouter(mode="hybrid", hybrid_top_k=2)
    for t, x in enumerate(train):
        r.add_task(t, x)
    x = _clusters(seed=5)[0][:4]
    # A likelihood that prefers the second-nearest task: hybrid must follow it.
    d = r.distances(x)
    second = d.argsort(1)[:, 1]

    def nll(index, tasks):
        return (tasks != second[index]).float()

    assert torch.equal(r.route(x, task_nll=nll), second)


def test_prototype_round_trip():
    p = fit_prototype(_clusters()[0])
    q = Prototype.from_tensors(p.to_tensors())
    assert torch.equal(p.mean, q.mean) and torch.equal(p.precision, q.precision) and p.threshold == q.threshold


def test_calibrated_routing_compares_in_threshold_units():
    train = _clusters()
    r = TaskRouter(calibrated=True)
    for t, x in enumerate(train):
        r.add_task(t, x)
    x = _clusters(seed=4)[1][:8]
    scale = torch.tensor([r.prototypes[t].threshold for t in range(3)], dtype=torch.float64)
    assert torch.equal(r.route(x), (r.distances(x) / scale).argmin(1))
    # make task 2's threshold tiny: in its units every image is far, so nothing goes there
    r.prototypes[2].threshold = 1e-9
    assert not (r.route(_clusters(seed=6)[2]) == 2).any()
    assert (r.route(_clusters(seed=6)[0]) == 0).all()
