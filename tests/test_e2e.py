"""End to end on tiny generated images: two tasks, one epoch, through the command line.

Checks the continual protocol's promises: routing without a task id, zero forgetting when routing is
right, a saved model that reloads to the same scores, add-task leaving old task files byte-identical,
predict writing JSON lines and maps, and one-line errors for user mistakes.
"""
import json
from pathlib import Path

import pytest
import numpy as np

from helpers import CONFIGS, write_striped_class
from moleflow.cli import main

@pytest.fixture(scope="module")
def fitted(striped_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    code = main(["--quiet", "fit", str(CONFIGS / "smoke.yaml"), f"data.root={striped_root}",
                 "scenario.tasks=[[bottle],[grid]]", "--out", str(run)])
    assert code == 0
    return run


def test_fit_writes_the_run_directory(fitted):
    for name in ("config.yaml", "results.json", "results.md", "model/manifest.json",
                 "model/shared.safetensors", "model/task_000.safetensors", "model/task_001.safetensors"):
        assert (fitted / name).is_file(), name
    r = json.loads((fitted / "results.json").read_text())
    assert r["tasks"] == [["bottle"], ["grid"]]
    assert [s["after_task"] for s in r["steps"]] == [0, 1]
    last = r["steps"][-1]["per_task"]
    for e in last:
        for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro", "routing_accuracy"):
            assert 0.0 <= e[k] <= 1.0, k
        assert set(e["oracle"]) >= {"image_auroc", "pixel_auroc", "pixel_ap", "aupro"}
    assert set(r["final"]) >= {"image_auroc", "pixel_auroc", "pixel_ap", "aupro", "routing_accuracy", "forgetting"}
    assert set(r["timings"]) >= {"features_s", "train_s_per_task", "eval_s"}
    assert len(r["timings"]["train_s_per_task"]) == 2


def test_routing_and_zero_forgetting(fitted):
    r = json.loads((fitted / "results.json").read_text())
    assert r["final"]["routing_accuracy"] == 1.0
    before = r["steps"][0]["per_task"][0]
    after = r["steps"][1]["per_task"][0]
    for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro"):
        assert after[k] == before[k], k  # exactly: old tasks' parameters never change
    assert r["final"]["forgetting"]["image_auroc"] == 0.0


def test_saved_model_reloads_to_the_same_scores(fitted, striped_root, tmp_path):
    code = main(["--quiet", "evaluate", str(fitted / "model"), "--out", str(tmp_path)])
    assert code == 0
    again = json.loads((tmp_path / "results.json").read_text())["steps"][-1]["per_task"]
    orig = json.loads((fitted / "results.json").read_text())["steps"][-1]["per_task"]
    for a, b in zip(again, orig):
        for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro"):
            assert a[k] == pytest.approx(b[k], abs=1e-9), k


def test_add_task_keeps_old_task_files_and_metrics(fitted, striped_root, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(fitted, run)
    model = run / "model"
    before = {p.name: p.read_bytes() for p in model.glob("*.safetensors")}
    code = main(["--quiet", "add-task", str(model), "--dataset", "mvtec", "--root", str(striped_root), "--classes", "screw"])
    assert code == 0
    for name, data in before.items():
        assert (model / name).read_bytes() == data, name
    assert (model / "task_002.safetensors").is_file()
    r = json.loads((run / "results.json").read_text())
    assert r["tasks"] == [["bottle"], ["grid"], ["screw"]]
    old = r["steps"][1]["per_task"]
    new = r["steps"][2]["per_task"]
    assert new[2]["routing_accuracy"] == 1.0
    for j in (0, 1):
        for k in ("image_auroc", "pixel_ap"):
            assert new[j][k] == old[j][k]


def test_predict_writes_json_lines_and_maps(fitted, striped_root, tmp_path):
    imgs = sorted((striped_root / "grid/test/hole").glob("*.png"))[:2] + sorted((striped_root / "bottle/test/good").glob("*.png"))[:1]
    code = main(["--quiet", "predict", str(fitted / "model"), *map(str, imgs), "--out", str(tmp_path)])
    assert code == 0
    lines = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [x["task"] for x in lines] == [1, 1, 0]
    for x in lines:
        assert isinstance(x["anomalous"], bool) and np.isfinite(x["image_score"])
        assert (tmp_path / x["map"]).is_file() and (tmp_path / x["overlay"]).is_file()


def test_user_errors_are_one_line(tmp_path, capsys, striped_root):
    cases = [
        ["evaluate", str(tmp_path)],  # not a model directory
        ["fit", str(CONFIGS / "smoke.yaml"), "train.lrr=1"],  # unknown key
        ["fit", str(CONFIGS / "smoke.yaml"), "scenario.tasks=[[nosuchclass]]", f"data.root={striped_root}", "--out", str(tmp_path / "r")],
        ["fit", str(CONFIGS / "smoke.yaml"), "scenario.tasks=[[bottle]]", "data.root=/nonexistent", "--out", str(tmp_path / "r2")],
    ]
    for argv in cases:
        assert main(["--quiet", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("moleflow ") and "error:" in err and "\n" not in err and "Traceback" not in err, err


@pytest.mark.parametrize("method", ["finetune", "joint"])
def test_baselines_use_the_same_protocol(method, striped_root, tmp_path):
    code = main(["--quiet", "fit", str(CONFIGS / "smoke.yaml"), f"data.root={striped_root}", f"method={method}",
                 "scenario.tasks=[[bottle],[grid]]", "--out", str(tmp_path)])
    assert code == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["method"] == method
    assert [s["after_task"] for s in r["steps"]] == ([0, 1] if method == "finetune" else [1])
    last = r["steps"][-1]["per_task"]
    assert [e["task"] for e in last] == [0, 1]
    assert all(e["routing_accuracy"] is None for e in last)  # one set of modules: nothing to route
    assert r["final"]["routing_accuracy"] is None and r["final"]["image_auroc"] is not None
    manifest = json.loads((tmp_path / "model/manifest.json").read_text())
    assert len(manifest["tasks"]) == 1 and manifest["tasks"][0]["classes"] == ["bottle", "grid"]
    # add-task is a continual operation: a baseline model refuses it with a one-line error
    assert main(["--quiet", "add-task", str(tmp_path / "model"), "--dataset", "mvtec", "--root", str(striped_root), "--classes", "screw"]) == 2


def test_readers_never_see_a_mix_while_a_task_is_added(fitted, striped_root, tmp_path):
    """add-task in another process while this one keeps loading the model: each load sees the model
    before or after the new task (every file listed verifies), never a half-written state."""
    import shutil
    import subprocess
    import sys

    from moleflow.model.checkpoint import read_checked, read_manifest

    run = tmp_path / "run"
    shutil.copytree(fitted, run)
    model = run / "model"
    proc = subprocess.Popen([sys.executable, "-m", "moleflow.cli", "--quiet", "add-task", str(model), "--dataset", "mvtec",
                             "--root", str(striped_root), "--classes", "screw"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = set()
    while True:
        finished = proc.poll() is not None
        m = read_manifest(model)
        read_checked(model, m["shared"])
        for entry in m["tasks"]:
            read_checked(model, entry)  # raises if a listed file were missing or half-written
        seen.add(len(m["tasks"]))
        if finished:
            break
    assert proc.returncode == 0, proc.stderr.read().decode()
    assert seen <= {2, 3} and 3 in seen


def test_skip_bad_lists_refused_files_and_goes_on(tmp_path, capsys):
    root = tmp_path / "data"
    write_striped_class(root, "bottle", (200, 60, 40), seed=1)
    (root / "bottle/train/good/999.png").write_bytes(b"this is not a png")
    args = ["--quiet", "fit", str(CONFIGS / "smoke.yaml"), f"data.root={root}", "scenario.tasks=[[bottle]]"]
    assert main([*args, "--out", str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err
    assert "999.png" in err and "\n" not in err.strip()
    assert main([*args, "--out", str(tmp_path / "lenient"), "--skip-bad"]) == 0
    r = json.loads((tmp_path / "lenient/results.json").read_text())
    assert [Path(s["path"]).name for s in r["skipped_files"]] == ["999.png"]
    assert r["skipped_files"][0]["reason"]
    train = r["steps"][0]["train"]
    # the shipped task trains on the 10 readable images; 2 shares of 3 scored by fold models
    assert (train["n_train"], train["n_calibration"], train["calibration_folds"]) == (10, 6, 2)
