"""Orthogonal gradient projection (V3-4) for the finetune baseline."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from moleflow.cli import main
from moleflow.config import ConfigError, load_config
from moleflow.features.cache import FeatureSet
from moleflow.model.mole_flow import MoLEFlow
from moleflow.continual.ogp import GradientMemory, task_gradients
from moleflow.continual.train import fit_task

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _low_rank_rows(rows: int, dim: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=g) @ torch.randn(rank, dim, generator=g)  # (rows, dim), rank `rank`


def test_basis_is_orthonormal_and_spans_the_gradients():
    mem = GradientMemory(threshold=1.0, max_rank=50)
    g = _low_rank_rows(12, 40, 3, seed=0)
    mem.add({"w": g})
    b = mem.bases["w"]
    assert b.shape == (40, 3)
    torch.testing.assert_close(b.T @ b, torch.eye(3), atol=1e-5, rtol=0)
    residual = g - (g @ b) @ b.T
    assert float(residual.norm() / g.norm()) < 1e-5


def test_threshold_keeps_that_share_of_the_energy_and_max_rank_caps_it():
    g = torch.randn(30, 25, generator=torch.Generator().manual_seed(1)) * torch.linspace(3, 0.1, 25)  # decaying spectrum
    mem = GradientMemory(threshold=0.9, max_rank=50)
    mem.add({"w": g})
    b = mem.bases["w"]
    explained = float((g @ b).pow(2).sum() / g.pow(2).sum())
    assert explained >= 0.9
    smaller = b[:, :-1]  # one direction fewer would not reach the threshold: the rank is minimal
    assert float((g @ smaller).pow(2).sum() / g.pow(2).sum()) < 0.9
    capped = GradientMemory(threshold=1.0, max_rank=4)
    capped.add({"w": g})
    assert capped.rank() == {"w": 4}


def test_a_second_task_adds_only_new_directions():
    mem = GradientMemory(threshold=1.0, max_rank=50)
    g1 = _low_rank_rows(10, 30, 2, seed=2)
    mem.add({"w": g1})
    mem.add({"w": 2.0 * g1[:5]})  # already spanned: nothing new
    assert mem.rank() == {"w": 2}
    mem.add({"w": _low_rank_rows(10, 30, 3, seed=3)})
    b = mem.bases["w"]
    assert b.shape[1] == 5
    torch.testing.assert_close(b.T @ b, torch.eye(5), atol=1e-5, rtol=0)


def test_projection_removes_stored_directions_and_keeps_the_rest():
    layer = nn.Linear(6, 4)
    mem = GradientMemory(threshold=1.0, max_rank=50)
    mem.add({"weight": _low_rank_rows(8, 24, 3, seed=4)})
    b = mem.bases["weight"]
    layer(torch.randn(5, 6)).pow(2).sum().backward()
    bias_grad = layer.bias.grad.clone()
    mem.project(layer.named_parameters())
    g = layer.weight.grad.reshape(-1)
    assert float((b.T @ g).abs().max()) < 1e-5  # nothing left in the stored subspace
    once = g.clone()
    mem.project(layer.named_parameters())
    torch.testing.assert_close(layer.weight.grad.reshape(-1), once, atol=1e-6, rtol=0)  # idempotent
    assert torch.equal(layer.bias.grad, bias_grad)  # tensors without a basis are untouched
    # A gradient orthogonal to the basis passes unchanged.
    free = torch.randn(24)
    free = free - b @ (b.T @ free)
    layer.weight.grad = free.reshape(4, 6).clone()
    mem.project(layer.named_parameters())
    torch.testing.assert_close(layer.weight.grad.reshape(-1), free, atol=1e-6, rtol=0)


def _features(n: int, seed: int) -> FeatureSet:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 4, 8, generator=g)  # (N, H, W, C)
    return FeatureSet(x, torch.randn(n, 8, generator=g), torch.zeros(n, dtype=torch.long), None, [f"{i}" for i in range(n)], ["a"] * n)


def test_a_fully_spanned_tensor_does_not_move_while_the_others_train():
    cfg = load_config(None, ["model.coupling_blocks=2", "model.lora_rank=2", "model.dia_blocks=1",
                             "train.epochs=2", "train.batch_size=2", "train.weight_decay=0"])  # AdamW's decay would move it
    model = MoLEFlow(cfg.model, 8)
    model.add_task(0)
    model.set_trainable(0)
    grads = task_gradients(model, 0, _features(6, 0), cfg.loss, torch.device("cpu"), batch_size=2, max_batches=3)
    assert grads and all(r.shape[0] == 3 for r in grads.values())
    name, p = next((n, p) for n, p in model.named_parameters() if n in grads and p.numel() <= 64)
    mem = GradientMemory(threshold=1.0, max_rank=1000)
    mem.bases[name] = torch.eye(p.numel())  # spans every direction of this tensor
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    fit_task(model, 0, _features(6, 1), cfg.train, cfg.loss, torch.device("cpu"), progress=False, memory=mem)
    after = dict(model.named_parameters())
    assert torch.equal(after[name], before[name])
    assert any(not torch.equal(after[n], before[n]) for n in grads if n != name)


def test_ogp_needs_the_finetune_baseline():
    with pytest.raises(ConfigError, match="method: finetune"):
        load_config(None, ["train.ogp=true"])
    assert load_config(None, ["train.ogp=true", "method=finetune"]).train.ogp


def test_finetune_with_ogp_end_to_end(tiny_mvtec, tmp_path):
    code = main(["--quiet", "fit", str(CONFIGS / "smoke.yaml"), f"data.root={tiny_mvtec}", "method=finetune",
                 "train.ogp=true", "train.ogp_batches=2", "scenario.tasks=[[bottle],[grid]]", "--out", str(tmp_path)])
    assert code == 0
    r = json.loads((tmp_path / "results.json").read_text())
    stored = [s["train"]["ogp_directions"] for s in r["steps"]]
    assert 0 < stored[0] < stored[1]  # task 0's subspace, then task 1's new directions added to it
    assert r["final"]["image_auroc"] is not None
    assert (tmp_path / "config.yaml").read_text().count("ogp: true") == 1
