"""The tail-aware loss analysis (`moleflow analyze tail`): statistics with known answers, then one tiny
end-to-end run: two runs trained through the CLI (mean-only and tail-aware) and the seven measurements."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moleflow.cli import main
from moleflow.config import LossConfig, ModelConfig, ScoringConfig
from moleflow.model.loss import tail_count
from moleflow.model.mole_flow import MoLEFlow
from moleflow.research.analysis import analyze_tail
from moleflow.research.analysis.loading import flow_outputs, read_task_results
from moleflow.research.analysis.statistics import (
    border_distance,
    border_ks,
    effective_count,
    fisher_ratio,
    gini,
    gradient_cells,
    histogram_overlap,
    latent_calibration,
    loss_patch_weights,
    loss_weight_gini_exact,
)
from moleflow.router import TaskRouter
from moleflow.scoring import Scorer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# --------------------------------------------------------------------------- statistics


def test_gini_known_values():
    assert gini(np.ones(50)) == pytest.approx(0.0, abs=1e-12)
    for n in (2, 10, 1000):
        one_hot = np.zeros(n)
        one_hot[3 % n] = 5.0
        assert gini(one_hot) == pytest.approx(1 - 1 / n)
    # two levels: half the items 0, half 1 -> Gini 1/2
    assert gini(np.r_[np.zeros(100), np.ones(100)]) == pytest.approx(0.5)
    assert gini(-np.arange(10.0)) == pytest.approx(gini(np.arange(10.0)))  # magnitudes
    assert effective_count(np.ones(37)) == pytest.approx(37)
    assert effective_count(np.eye(1, 20)[0]) == pytest.approx(1)


def test_fisher_ratio_and_overlap():
    rng = np.random.default_rng(0)
    a = rng.normal(4.0, 1.0, 200_000)
    b = rng.normal(0.0, 1.0, 200_000)
    assert fisher_ratio(a, b) == pytest.approx(16 / 2, rel=0.02)
    assert fisher_ratio(b, b) == 0.0
    # overlap of N(0,1) and N(4,1) is 2·Φ(−2) ≈ 0.0455; identical samples overlap completely
    assert histogram_overlap(a, b, bins=200) == pytest.approx(0.0455, abs=0.01)
    assert histogram_overlap(b, b) == pytest.approx(1.0)
    assert histogram_overlap(np.zeros(10), np.ones(10)) == 0.0


def test_border_distance_and_ks():
    d = border_distance(5, 6)
    assert d.shape == (5, 6)
    assert d[0].tolist() == [0] * 6 and d[:, 0].tolist() == [0] * 5
    assert d[2].tolist() == [0, 1, 2, 2, 1, 0]
    all_d = border_distance(16, 16).reshape(-1)
    stat, p = border_ks(all_d, all_d)  # identical samples: no difference at all
    assert stat == 0.0 and p == pytest.approx(1.0)
    stat, p = border_ks(np.zeros(200), all_d)  # every tail patch on the outer ring
    assert stat > 0.7 and p < 1e-10


def test_gradient_cells_finds_the_edge():
    img = torch.zeros(3, 32, 32)
    img[:, :, 16:] = 1.0  # a vertical edge between columns 15 and 16
    cells = gradient_cells(img, (4, 4))
    assert cells.shape == (4, 4)
    assert np.all(cells[:, 1:3] > 0) and np.allclose(cells[:, [0, 3]], 0)


def test_latent_calibration_of_true_gaussians():
    rng = np.random.default_rng(1)
    res = latent_calibration(rng.standard_normal((3000, 16)), rng)
    assert res["qq_r"] > 0.999
    assert res["q_err_0.99"] < 0.05 and res["q_err_0.01"] < 0.05
    assert res["sq_norm_per_dim"] == pytest.approx(1.0, abs=0.03)
    assert res["normal_frac_p_gt_0.05"] >= 0.75
    heavy = latent_calibration(rng.standard_t(2, (3000, 16)), rng)  # heavy tails
    assert heavy["qq_r"] < res["qq_r"] and heavy["q_err_0.999"] > 1.0
    assert heavy["normal_frac_p_gt_0.05"] < 0.2


@pytest.mark.parametrize("w,rho", [(0.7, 0.02), (1.0, 0.1), (0.0, 0.02), (0.3, 0.5)])
def test_loss_weights_are_exact(w, rho):
    b, h, wd, c = 3, 8, 10, 4
    torch.manual_seed(0)
    z, ld = torch.randn(b, h, wd, c), torch.randn(b, h, wd)
    cfg = LossConfig(tail_weight=w, tail_ratio=rho, lambda_logdet=1e-2, whitening_reg=0.1)  # regularisers are ignored
    weights = loss_patch_weights(z, ld, cfg)  # (B, H, W)
    n = b * h * wd
    k = tail_count(n, rho)
    expected = torch.full((n,), (1 - w) / n, dtype=torch.float64)
    nll = ((0.5 * z.pow(2).sum(-1) - ld) / c).reshape(-1)
    expected[nll.topk(k).indices] += w / k
    torch.testing.assert_close(weights.reshape(-1).double(), expected, rtol=1e-5, atol=1e-7)
    assert gini(weights) == pytest.approx(loss_weight_gini_exact(w, rho, n), abs=1e-5)


@settings(max_examples=200, deadline=None)
@given(w=st.floats(0.0, 1.0), rho=st.floats(1e-3, 1.0), n=st.integers(1, 3000))
def test_exact_gini_is_the_gini_of_the_two_level_weights(w, rho, n):
    # the closed form against the general Gini of the weights it describes: K at (1−w)/N + w/K, the rest (1−w)/N
    k = tail_count(n, rho)
    weights = np.full(n, (1 - w) / n)
    weights[:k] += w / k
    exact = loss_weight_gini_exact(w, rho, n)
    assert exact == pytest.approx(gini(weights), abs=1e-9)
    assert 0.0 <= exact <= w * (1 - 1 / n) + 1e-12  # at most one patch carrying all of the tail share
    assert loss_weight_gini_exact(w, min(1.0, 2 * rho), n) <= exact + 1e-12  # a larger tail spreads the weight


@pytest.mark.parametrize("dia_blocks", [2, 0])
def test_flow_outputs_match_the_model(dia_blocks):
    cfg = ModelConfig(coupling_blocks=3, lora_rank=2, context_kernel=3, dia_blocks=dia_blocks)
    model = MoLEFlow(cfg, 6)
    model.add_task(0)
    if dia_blocks:
        with torch.no_grad():  # move the zero-initialised DIA off the identity so its log-det is not 0
            for p in model.dia["0"].parameters():
                p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(5, 4, 4, 6)
    scorer = Scorer(model, TaskRouter(), ScoringConfig(), 32, torch.device("cpu"))
    out = flow_outputs(scorer, 0, x, dia_blocks, batch_size=2)
    with torch.no_grad(), model.use_task(0):
        z, ld = model(x)
    torch.testing.assert_close(out.z, z)
    torch.testing.assert_close(out.log_det, ld)
    assert len(out.block_logdets) == 3
    torch.testing.assert_close(sum(out.block_logdets) + out.dia_logdet, ld)
    assert (out.dia_logdet.abs().sum() > 0) == bool(dia_blocks)


# --------------------------------------------------------------------------- end to end


def _fit(root: Path, out: Path, tail_weight: float) -> None:
    code = main(["--quiet", "fit", str(CONFIGS / "smoke.yaml"), f"data.root={root}", "scenario.tasks=[[bottle]]",
                 f"loss.tail_weight={tail_weight}", "train.record_grad_norms=true", "train.epochs=2", "--out", str(out)])
    assert code == 0


def test_analyze_tail_end_to_end(tiny_mvtec, tmp_path):
    runs = {w: tmp_path / f"w{w}" for w in (0, 0.7)}
    for w, d in runs.items():
        _fit(tiny_mvtec, d, w)
    out = tmp_path / "analysis"
    md_path = analyze_tail(runs[0], runs[0.7], out, sweep=[runs[0.7]], max_images=8, progress=False)
    assert md_path == out / "analysis.md"
    md = md_path.read_text()
    for i in range(1, 8):
        assert f"## {i}. " in md
    assert "not applicable" not in md.lower() and "not recorded" not in md.lower()
    for png in ("tail_spatial", "tail_feature_similarity", "grad_norms", "latent_calibration", "score_separation",
                "block_logdets", "loss_concentration"):
        p = out / f"{png}.png"
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"({png}.png)" in md
    data = json.loads((out / "analysis.json").read_text())
    mean_only, tail_aware = (r["concentration"] for r in data["per_run"])
    assert mean_only["gini"] == pytest.approx(0.0, abs=1e-6)  # the plain mean weighs every patch alike
    assert tail_aware["gini"] == pytest.approx(tail_aware["gini_exact"], abs=1e-5)
    assert data["grad_norms"]["recorded"] and len(data["grad_norms"]["rows"]) == 2  # smoke: 2 coupling blocks
    assert data["grad_norms"]["epochs"] == [2, 2]
    assert [r["part"] for r in data["per_run"][0]["logdet"]["rows"]] == ["block0", "block1", "dia", "total"]
    assert len(data["sweep"]) == 1 and data["sweep"][0]["tail_ratio"] == 0.02
    assert data["config_diff"] == [["loss.tail_weight", 0.0, 0.7]]
    sp = data["per_run"][1]["spatial"]
    assert 0.0 <= sp["ks_p"] <= 1.0 and -1.0 <= sp["spearman_nll_gradient"] <= 1.0


def test_analyze_tail_names_a_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.json"):
        (tmp_path / "r").mkdir()
        (tmp_path / "r" / "config.yaml").write_text("{}")
        analyze_tail(tmp_path / "r", tmp_path / "r", tmp_path / "out", progress=False)


def test_read_task_results_takes_the_last_step_and_the_learning_step(tmp_path):
    steps = [{"after_task": 0, "train": {"grad_norms": [{"block0": 1.0}, {"block0": 0.5}]},
              "per_task": [{"task": 0, "image_auroc": 0.5}]},
             {"after_task": 1, "train": {}, "per_task": [{"task": 1, "image_auroc": 0.7}, {"task": 0, "image_auroc": 0.9, "pixel_ap": 0.3}]}]
    (tmp_path / "results.json").write_text(json.dumps({"steps": steps}))
    first = read_task_results(tmp_path, 0)
    assert first.metrics == {"image_auroc": 0.9, "pixel_auroc": None, "pixel_ap": 0.3, "aupro": None}
    assert first.grad_norms == [{"block0": 1.0}, {"block0": 0.5}]
    assert read_task_results(tmp_path, 1).grad_norms == []  # learned without train.record_grad_norms
    assert set(read_task_results(tmp_path, 5).metrics.values()) == {None}  # a task the run does not have
