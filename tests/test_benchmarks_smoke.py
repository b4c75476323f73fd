"""Smoke runs of benchmarks/speed.py and peers.py on tiny generated data with a tiny config.

The figures themselves are machine-dependent; these tests check that the scripts run end to end, report
every key the issue asks for, and that speed.py's predict computation is the one the evaluation uses.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from helpers import write_tiny_mvtec
from moleflow.config import Config
from moleflow.data import build_dataset
from moleflow.features.cache import extract_features
from moleflow.continual.system import build_system, learn_new_task, task_features
from moleflow.model.lora import LoRALinear

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

TINY = [
    "backbone.weights=none", "data.image_size=64", "backbone.batch_size=4", "train.batch_size=4",
    "model.coupling_blocks=2", "model.lora_rank=4", "model.dia_blocks=1",
]


def _load(name: str):
    """benchmarks/NAME.py as module NAME (peers.py imports speed.py as a sibling module, so the same name)."""
    if name in sys.modules and Path(sys.modules[name].__file__ or "").parent == BENCH:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def speed():
    return _load("speed")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return write_tiny_mvtec(tmp_path_factory.mktemp("bench") / "mvtec", ("bottle", "grid"), size=64)


def test_speed_json_has_every_figure(speed, tiny_root, capsys):
    code = speed.main([
        "--json", "--category", str(tiny_root / "bottle"), "--epochs", "1", "--images", "4", "--warmup", "1",
        "--repeats", "2", "--tasks", "3", "--extra", "grid", "--variants", "bf16,int8", *[a for s in TINY for a in ("--set", s)],
    ])  # torch.compile (~1 min of compiling) is left out here: test_compile_variant_chain_is_the_models below
    assert code == 0
    result = json.loads(capsys.readouterr().out)  # stdout holds exactly one JSON object
    rounds = {"backbone_img_s": "backbone", "predict_img_s_T1": "predict_T1", "predict_img_s_T3": "predict_T3",
              "predict_img_s_T3_mixed": "predict_T3_mixed"}
    for key, name in rounds.items():
        assert math.isfinite(result[key]) and result[key] > 0, key
        assert len(result["rates_all_rounds"][name]) == 2  # --repeats 2
        assert result[key] == pytest.approx(sorted(result["rates_all_rounds"][name])[0] / 2 + sorted(result["rates_all_rounds"][name])[1] / 2)
    stages = result["predict_stages_ms_per_img_T1"]
    assert set(stages) == {"features", "routing", "flow", "map", "image_score"} and all(v >= 0 for v in stages.values())
    installed = {rt for rt, module in (("onnx", "onnxruntime"), ("openvino", "openvino")) if importlib.util.find_spec(module)}
    expected = {"torch", "torch-bf16-backbone", "torch-bf16", *installed}
    if "onnx" in installed:
        expected |= {"onnx-int8-backbone", "onnx-int8-chain", "onnx-int8"}
    if "openvino" in installed:
        expected.add("openvino-bf16")
    assert set(result["runtimes_img_s"]) == expected  # every runtime side by side, 1 and 3 tasks
    assert all(set(v) == {"T1", "T3"} and min(v.values()) > 0 for v in result["runtimes_img_s"].values())
    assert set(result["runtimes_setup_s"]) == set(result["runtimes_parity"]) == expected - {"torch"}
    for name, p in result["runtimes_parity"].items():
        # the batch at 1 and 3 tasks and the mixed batch, every image compared with PyTorch f32
        assert p["images"] == 12 and 0 <= p["tasks_same"] <= 12 and 0 <= p["verdicts_same"] <= 12, name
        assert all(math.isfinite(p[k]) and p[k] >= 0 for k in ("score_rel_max", "map_abs_max", "map_rel_max")), name
    for rt in installed:  # the f32 exports keep parity
        assert result["runtimes_parity"][rt]["keeps_parity"], result["runtimes_parity"][rt]
    assert result["params_shared"] > 0 and result["params_per_task"] > 0
    assert result["peak_rss_mb"] >= result["peak_rss_mb_torch"] > 0
    tb = result["train_breakdown"]
    assert tb["n_images"] == 4 and tb["epochs"] == 1  # the tiny class has 4 training images (< 200: noted)
    assert result["train_s_200img"] == pytest.approx(tb["features_s"] + tb["learn_s"])
    assert 0 < tb["fit_s"] <= tb["learn_s"]
    # --epochs 1 is not the default: the output says so and projects the default's time.
    default = Config().train.epochs
    assert default > 1 and result["meta"]["epochs"] == 1 and result["meta"]["epochs_default"] == default
    assert result["train_s_200img_projected_default_epochs"] == pytest.approx(result["train_s_200img"] + (default - 1) * tb["fit_s"])
    assert result["meta"]["tasks"] == 3
    assert any("only 4 training images" in n for n in result["notes"])
    assert result["ratios"]["predict_T1_over_backbone"] == pytest.approx(result["predict_img_s_T1"] / result["backbone_img_s"])
    text = speed.format_table(result)
    assert f"NOT the default {default}" in text and "issue 6 targets" in text
    assert "runtimes side by side" in text and all(f"\n{name} " in text for name in expected)


def test_compile_variant_chain_is_the_models(speed, tiny_root):
    """torch.compile's input in speed.py: each task's chain with the LoRA merged into nn.Linear computes
    what the model's own chain (LoRA merge cache) computes; compiling it is torch's part."""
    cfg = speed.benchmark_config(tiny_root / "bottle", 1, TINY)
    system = build_system(cfg)
    for k, spec in enumerate(("bottle", "grid")):
        learn_new_task(system, [spec], task_features(system, [spec], "train", False), False, step=k)
    patches = system.extractor(torch.rand(3, 3, 64, 64))[0].detach()
    eager, merged = speed.torch_chains(system), speed.torch_chains(system, merged=True)
    assert set(eager) == set(merged) == {0, 1}
    with torch.no_grad():
        for t in eager:
            assert not any(isinstance(m, LoRALinear) for m in merged[t].model.modules())
            for a, b in zip(eager[t](patches), merged[t](patches)):
                torch.testing.assert_close(b, a, rtol=0, atol=0)  # the same numbers


def test_predict_batch_matches_the_evaluation_path(speed, tiny_root):
    """predict_batch (what `moleflow predict` computes) scores an image exactly as evaluation does."""
    cfg = speed.benchmark_config(tiny_root / "bottle", 1, TINY)
    system = build_system(cfg)
    learn_new_task(system, ["bottle"], task_features(system, ["bottle"], "train", False), False, step=0)
    test = build_dataset(cfg.data, "bottle", "test")
    images = torch.stack([test[i]["image"] for i in range(len(test))])
    routed, scores, maps = speed.predict_batch(system, images)
    assert routed.tolist() == [0] * len(test)
    ref = system.scorer.score_features(extract_features(system.extractor, test, progress=False), routed)
    torch.testing.assert_close(scores, ref.image, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(maps, ref.maps, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("anomalib") is not None, reason="anomalib is installed: peers would really run")
def test_peers_without_anomalib_says_why(tiny_root, capsys):
    peers = _load("peers")
    code = peers.main(["--models", "patchcore,cflow", "--category", str(tiny_root / "bottle")])
    out = capsys.readouterr()
    assert code == 1
    assert "anomalib cannot be imported" in out.err and ".venv-bench" in out.err
    assert "not run" in out.out and "Traceback" not in out.out + out.err


def test_serve_benchmark_reports_rates_latency_and_failures_across_an_add_task(trained_model, striped_root, capsys):
    serve = _load("serve")
    code = serve.main([str(trained_model), str(striped_root / "bottle" / "test"), "--clients", "3", "--requests", "9",
                       "--add", "mvtec:screw", "--root", str(striped_root), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["predict_img_s"] > 0 and out["served_over_predict"] > 0
    for phase in ("served", "served_during_add_task", "served_after_add_task"):
        r = out[phase]
        assert r["failed"] == 0 and r["img_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0
    assert out["served"]["generations"] == [1] and out["served_after_add_task"]["generations"] == [2]


def test_blend_weight_recomputes_each_tasks_stored_choice(tiny_root, tmp_path, capsys):
    """benchmarks/blend_weight.py on a saved two-task model: a row per task and candidate weight, every
    figure a share in [0, 1], and the weight each task stored when it trained is the best synthetic row
    among the training candidates (the script redoes the seeded choice of continual/blend_weight.py)."""
    from moleflow.config import load_config
    from moleflow.continual.jobs import run_fit

    cfg = load_config(None, ["data.dataset=mvtec", f"data.root={tiny_root}", "scenario.tasks=[[bottle],[grid]]",
                             "output.plots=false", "scoring.calibration_holdout=0", "model.memory_share=0.5", *TINY])
    run_fit(cfg, tmp_path / "run", progress=False, echo=lambda *a: None)
    code = _load("blend_weight").main([str(tmp_path / "run" / "model"), "--weights", "0,0.8,0.9,1", "--cache", "",
                                       "--category", str(tiny_root / "bottle"), "--category", str(tiny_root / "grid")])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()[2:]
    rows = [line.split("|")[1:-1] + ["<- stored" in line.split("|")[-1]] for line in lines]  # cells, stored?
    assert [(int(r[1]), r[2].strip(), float(r[3])) for r in rows] == [(t, c, w) for t, c in ((0, "bottle"), (1, "grid"))
                                                                        for w in (0, 0.8, 0.9, 1)]
    assert all(0 <= float(v) <= 1 for r in rows for v in r[4:8]) and len(rows[0]) == 9
    for t in (0, 1):
        mine = [r for r in rows if int(r[1]) == t and float(r[3]) in cfg.scoring.memory_weights]
        stored = [r for r in mine if r[-1]]
        assert len(stored) == 1
        best = max(mine, key=lambda r: (float(r[4]), float(r[3])))  # a tie goes to the memory, as in training
        assert stored[0] == best
