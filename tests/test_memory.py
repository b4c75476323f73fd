"""The per-task patch memory (model/memory.py): PatchCore's coreset and nearest distance, kept per task."""
import torch

from helpers import tiny_memory_model

from moleflow.config import ScoringConfig
from moleflow.model.memory import PatchMemory, greedy_coreset
from moleflow.scoring import patch_score_label, routed_patch_scores, task_patch_scores


def test_greedy_coreset_keeps_the_farthest_patch_each_step():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(300, 5, generator=g)
    kept = greedy_coreset(bank, 12, seed=3).tolist()
    assert len(set(kept)) == 12
    for i in range(1, 12):  # brute force: the next one is the farthest from all kept so far
        d = torch.cdist(bank, bank[kept[:i]]).min(dim=1).values
        assert kept[i] == int(d.argmax())
    assert greedy_coreset(bank, 12, seed=3).tolist() == kept


def test_distance_is_the_nearest_memory_patch_in_blocks():
    g = torch.Generator().manual_seed(1)
    mem = PatchMemory(6)
    mem.bank = torch.randn(50, 6, generator=g)
    x = torch.randn(2, 3, 4, 6, generator=g)
    ref = torch.cdist(x.reshape(-1, 6).double(), mem.bank.double()).min(dim=1).values.reshape(2, 3, 4)
    torch.testing.assert_close(mem.distance(x).double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mem.distance(x, rows=7), mem.distance(x), rtol=1e-5, atol=1e-5)  # blocks of 7 query patches
    assert float(mem.distance(mem.bank[:4].reshape(1, 2, 2, 6)).max()) < 1e-2  # a memory patch is at distance ~0


def test_memory_is_the_tasks_own_and_loads_at_its_own_size():
    model = tiny_memory_model()
    g = torch.Generator().manual_seed(2)
    p0, p1 = torch.randn(6, 4, 4, 8, generator=g), torch.randn(9, 4, 4, 8, generator=g) + 3
    model.fit_memory(0, p0, seed=0)
    model.fit_memory(1, p1, seed=0)
    assert model.memory["0"].bank.shape == (int(0.05 * 96), 8) and model.memory["1"].bank.shape == (int(0.05 * 144), 8)
    assert model.task_parameter_count(0) == model.task_parameter_count(1)  # buffers, not parameters
    # a memory patch is one of the task's own training patches
    flat0 = p0.reshape(-1, 8)
    assert all(bool((flat0 == row).all(dim=1).any()) for row in model.memory["0"].bank)
    other = tiny_memory_model()
    other.load_task_state_dict(1, model.task_state_dict(1))
    assert torch.equal(other.memory["1"].bank, model.memory["1"].bank)
    assert torch.equal(other.memory["1"].scale, model.memory["1"].scale)


def test_blend_is_the_weighted_sum_of_both_scores_over_their_training_medians_and_routes_per_task():
    model = tiny_memory_model()
    g = torch.Generator().manual_seed(3)
    p = [torch.randn(6, 4, 4, 8, generator=g), torch.randn(6, 4, 4, 8, generator=g) * 2]
    for t in (0, 1):
        model.fit_memory(t, p[t], seed=0)
    x = torch.randn(3, 4, 4, 8, generator=g)
    cfg = ScoringConfig(patch_score="blend", memory_weight_from="fixed", memory_weight=0.25)
    with torch.no_grad(), model.use_task(1):
        z, _ = model(x)
        d = model.memory["1"].distance(x)
        s = task_patch_scores(model, x, cfg)
        # the scales are the medians over the training patches
        zt, _ = model(p[1])
        assert torch.allclose(model.memory["1"].scale[0], zt.norm(dim=-1).median())
    ref = 0.75 * z.norm(dim=-1) / model.memory["1"].scale[0] + 0.25 * d / model.memory["1"].scale[1]
    torch.testing.assert_close(s, ref)
    with torch.no_grad():
        mixed = routed_patch_scores(model, x, torch.tensor([1, 0, 1]), cfg)
        with model.use_task(0):
            s0 = task_patch_scores(model, x, cfg)
    torch.testing.assert_close(mixed, torch.stack([s[0], s0[1], s[2]]))
    memory_only = ScoringConfig(patch_score="blend", memory_weight_from="fixed", memory_weight=1.0)
    with torch.no_grad(), model.use_task(1):  # memory_weight 1: PatchCore's score in units of its median
        torch.testing.assert_close(task_patch_scores(model, x, memory_only), d / model.memory["1"].scale[1])
    assert "flow" in patch_score_label(cfg) and "flow" not in patch_score_label(memory_only)
    # a task's own weight names its map: the shares of both parts, or the memory alone at 1
    assert "0.2·flow ‖z‖ + 0.8·nearest-patch distance" in patch_score_label(cfg, 0.8)
    assert "flow" not in patch_score_label(cfg, 1.0)
    assert "0.8·nearest" in patch_score_label(ScoringConfig(patch_score="blend", memory_weight_from="fixed"))  # 0.8 fixed
    # a throwaway model scored by the memory alone skips the flow's median; the distance's is the same
    bare = tiny_memory_model()
    bare.fit_memory(1, p[1], seed=0, flow_scale=False)
    assert torch.equal(bare.memory["1"].bank, model.memory["1"].bank)
    assert bare.memory["1"].scale[0] == 1 and bare.memory["1"].scale[1] == model.memory["1"].scale[1]
    with torch.no_grad(), bare.use_task(1):
        torch.testing.assert_close(task_patch_scores(bare, x, memory_only), d / model.memory["1"].scale[1])


def test_hybrid_routing_by_memory_picks_the_task_whose_memory_is_nearest():
    from moleflow.config import RouterConfig
    from moleflow.router import TaskRouter
    from moleflow.scoring import Scorer

    model = tiny_memory_model()
    g = torch.Generator().manual_seed(4)
    p = [torch.randn(6, 4, 4, 8, generator=g), torch.randn(6, 4, 4, 8, generator=g) + 4]
    router = TaskRouter(RouterConfig(mode="hybrid", hybrid_score="memory", shrinkage=0.5))
    for t in (0, 1):
        model.fit_memory(t, p[t], seed=0)
        router.add_task(t, torch.randn(6, 16, generator=g) + 10 * t)  # descriptors: task 1 far away
    scorer = Scorer(model, router, ScoringConfig(), 32, torch.device("cpu"))
    x = torch.cat([p[1][:2], p[0][:1]])  # patches of task 1, 1, 0 ...
    desc = torch.zeros(3, 16)  # ... whose descriptors all sit at task 0's prototype
    assert router.distances(desc).argmin(dim=1).tolist() == [0, 0, 0]
    assert scorer.route(x, desc).tolist() == [1, 1, 0]  # the memories decide between the top two
