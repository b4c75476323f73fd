import torch

import pytest

from moleflow.config import RouterConfig
from moleflow.router import UNKNOWN, Prototype, TaskRouter, fit_prototype, select_descriptor


def notes_router(**settings) -> TaskRouter:
    """A router with the notes' rule unless told otherwise (mean descriptor, Ledoit-Wolf, Gaussian distance)."""
    return TaskRouter(RouterConfig(**{"descriptor": "mean", "shrinkage": -1.0, "likelihood": False, "robust_dof": 0.0,
                                      **settings}))


def desc(x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
    """Extractor-layout descriptors [mean part, log-RMS part] (B, 2D); `other` fills the log-RMS part."""
    return torch.cat([x, torch.zeros_like(x) if other is None else other], dim=1)


def _clusters(n=60, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = [torch.zeros(d), torch.full((d,), 3.0), torch.linspace(-3, 3, d)]
    return [desc(c + torch.randn(n, d, generator=g)) for c in centres]


def test_mahalanobis_routing_batched():
    train = _clusters(seed=0)
    test = _clusters(seed=1)
    r = notes_router()
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
    r = notes_router()
    r.add_task(0, desc(a))
    r.add_task(1, desc(b))
    x = desc(torch.tensor([[6.0, 0.0]]))
    assert (x[:, :2] - a.mean(0)).norm() > (x[:, :2] - b.mean(0)).norm()  # Euclidean says task 1
    assert int(r.route(x)[0]) == 0


def test_oracle_and_unknown():
    train = _clusters()
    r = notes_router(mode="oracle")
    assert (r.route(train[0], true_tasks=torch.full((60,), 2)) == 2).all()
    r = notes_router(unknown=True)
    for t, x in enumerate(train[:2]):
        r.add_task(t, x)
    assert (r.route(_clusters(seed=3)[0]) == 0).float().mean() > 0.9
    far = desc(torch.full((5, 16), 50.0))
    assert (r.route(far) == UNKNOWN).all()


def test_hybrid_picks_lower_nll_among_top2():
    train = _clusters()
    r = notes_router(mode="hybrid", hybrid_top_k=2)
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
    p = fit_prototype(_clusters()[0][:, :16], shrinkage=0.5)
    q = Prototype.from_tensors(p.to_tensors())
    assert torch.equal(p.mean, q.mean) and torch.equal(p.precision, q.precision) and p.threshold == q.threshold
    assert p.log_det == q.log_det


def test_calibrated_routing_compares_in_threshold_units():
    train = _clusters()
    r = notes_router(calibrated=True)
    for t, x in enumerate(train):
        r.add_task(t, x)
    x = _clusters(seed=4)[1][:8]
    scale = torch.tensor([r.prototypes[t].threshold for t in range(3)], dtype=torch.float64)
    assert torch.equal(r.route(x), (r.distances(x) / scale).argmin(1))
    # make task 2's threshold tiny: in its units every image is far, so nothing goes there
    r.prototypes[2].threshold = 1e-9
    assert not (r.route(_clusters(seed=6)[2]) == 2).any()
    assert (r.route(_clusters(seed=6)[0]) == 0).all()


def test_descriptor_choice_routes_on_its_own_statistic():
    g = torch.Generator().manual_seed(0)
    same_mean = torch.randn(3, 80, 8, generator=g)  # the means of the three tasks look alike ...
    spread = [torch.randn(80, 8, generator=g) * 0.2 + 2.0 * t for t in range(3)]  # ... their log RMSs do not
    r_std, r_mean = notes_router(descriptor="log_rms"), notes_router(descriptor="mean")
    for t in range(3):
        r_std.add_task(t, desc(same_mean[t], spread[t]))
        r_mean.add_task(t, desc(same_mean[t], spread[t]))
    test = [desc(torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g) * 0.2 + 2.0 * t) for t in range(3)]
    assert all((r_std.route(x) == t).all() for t, x in enumerate(test))
    assert sum(float((r_mean.route(x) == t).float().mean()) for t, x in enumerate(test)) / 3 < 0.7  # near chance
    torch.testing.assert_close(select_descriptor(test[0], "log_rms"), test[0][:, 8:])
    with pytest.raises(ValueError, match="router.descriptor"):
        select_descriptor(test[0], "max")


def test_fixed_shrinkage_and_likelihood_rule():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=g) * torch.tensor([3.0, 1.0, 1.0, 0.5])
    p = fit_prototype(x, shrinkage=0.7)
    s = torch.cov(x.double().T)
    cov = 0.3 * s + 0.7 * (torch.trace(s) / 4) * torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(p.precision, torch.linalg.inv(cov), rtol=1e-6, atol=1e-9)
    assert p.log_det == pytest.approx(float(torch.logdet(cov)), rel=1e-6)
    # Likelihood: a broad task and a narrow one at the same squared distance -> the narrow one explains the
    # image better (its density is higher there); plain Mahalanobis cannot tell them apart.
    broad, narrow = torch.randn(500, 2, generator=g) * 4.0, torch.randn(500, 2, generator=g) + torch.tensor([14.0, 0.0])
    r_lik, r_dist = notes_router(shrinkage=0.0, likelihood=True), notes_router(shrinkage=0.0, likelihood=False)
    for r in (r_lik, r_dist):
        r.add_task(0, desc(broad))
        r.add_task(1, desc(narrow))
    probe = desc(torch.tensor([[11.0, 0.0]]))  # d² ≈ 121/16 ≈ 7.6 to the broad, ≈ 9 to the narrow
    d = r_lik.distances(probe)[0]
    assert float(d[0]) < float(d[1]) < float(d[0]) + r_lik.prototypes[0].log_det - r_lik.prototypes[1].log_det
    assert int(r_dist.route(probe)[0]) == 0 and int(r_lik.route(probe)[0]) == 1


def test_student_t_axes_keep_a_defect_with_its_product():
    """An image of product 0 moved far along two of its 24 principal axes (a defect) is nearer product 1
    (off along every axis, most along those two) by Mahalanobis distance; per-axis Student-t distances
    route it to product 0."""
    g = torch.Generator().manual_seed(0)
    d = 24
    scale = 2.0 ** torch.linspace(-1, 1, d)  # distinct variances: the principal axes are the coordinates
    offset = torch.ones(d)
    offset[:2] = 5.0
    own, other = torch.randn(2000, d, generator=g) * scale, torch.randn(2000, d, generator=g) * scale + offset
    defect = torch.zeros(1, d)
    defect[0, :2] = 7.0  # ≈ 14 σ along two axes from its own product; ≈ 4 σ there and ≈ 1 σ elsewhere from the other
    gauss, robust = notes_router(shrinkage=0.0, robust_dof=0.0), notes_router(shrinkage=0.0, robust_dof=3.0)
    for r in (gauss, robust):
        r.add_task(0, desc(own))
        r.add_task(1, desc(other))
    probes = torch.cat([defect, own[:50] * 0.5, other[:50]])
    truth = torch.cat([torch.zeros(51), torch.ones(50)]).long()
    d2 = gauss.distances(desc(defect))[0]
    assert float(d2[1]) < float(d2[0])  # the Gaussian rule sends the defect to the other product
    assert int(gauss.route(desc(defect))[0]) == 1
    assert torch.equal(robust.route(desc(probes)), truth)  # the t rule: the defect home, the rest unchanged
    # The per-axis squared distances sum to the Mahalanobis distance.
    proto = robust.prototypes[0]
    torch.testing.assert_close(proto.axis_distances(defect).sum(1), gauss.distances(desc(defect))[:, 0])


def test_held_out_calibration_of_the_unknown_answer():
    """Calibrated on images its prototype did not see, the unknown threshold lets fresh images of the
    product through (in-sample distances are smaller than a new image's) and still refuses another product."""
    g = torch.Generator().manual_seed(0)
    d, n = 16, 40
    train, fresh = torch.randn(n, d, generator=g), torch.randn(2000, d, generator=g)
    other = torch.randn(500, d, generator=g) + 4.0
    rule = RouterConfig(unknown=True, unknown_margin=1.5)
    insample, honest = TaskRouter(rule), TaskRouter(rule)
    insample.add_task(0, desc(train, train))
    honest.add_task(0, desc(train, train), held_out=torch.arange(0, n, 5))
    assert honest.prototypes[0].threshold > insample.prototypes[0].threshold
    torch.testing.assert_close(honest.prototypes[0].mean, insample.prototypes[0].mean)  # routing itself unchanged
    unknown = lambda r, x: float((r.route(desc(x, x)) == UNKNOWN).float().mean())  # noqa: E731
    assert unknown(honest, fresh) <= 0.02 and unknown(honest, fresh) <= unknown(insample, fresh)
    assert unknown(honest, other) >= 0.95
