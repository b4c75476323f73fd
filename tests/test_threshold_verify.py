"""`moleflow threshold` changes a task's threshold the supported way (sealed, recorded, picked up by the
service) and `moleflow verify` says what it checked and what failed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from moleflow import Detector
from moleflow.cli import main
from moleflow.integrity import seal_problem
from moleflow.service.model_slot import ModelSlot


@pytest.fixture
def model(trained_model, tmp_path) -> Path:
    shutil.copytree(trained_model, tmp_path / "model")
    return tmp_path / "model"


def _manifest(model: Path) -> dict:
    return json.loads((model / "manifest.json").read_text())


def _defect(striped_root: Path) -> Path:
    return sorted((striped_root / "grid" / "test" / "hole").glob("*.png"))[0]


def test_threshold_by_value_is_sealed_recorded_and_used(model, striped_root, capsys):
    before = Detector.load(model).predict(_defect(striped_root))
    assert before.task == 1
    high = before.score * 2 + 1
    assert main(["--quiet", "threshold", str(model), "--task", "grid", "--value", str(high)]) == 0
    assert "task 1 (grid): threshold" in capsys.readouterr().out
    m = _manifest(model)
    assert seal_problem(m) is None  # written with its digest: a later hand edit is refused
    entry = m["tasks"][1]
    assert entry["threshold"] == high
    (change,) = entry["threshold_log"]
    assert change["old"] == before.threshold and change["new"] == high and change["how"] == "set by value" and change["when"]
    after = Detector.load(model).predict(_defect(striped_root))
    assert (after.score, after.threshold, after.anomalous) == (before.score, high, False)
    assert m["tasks"][0] == _manifest(model)["tasks"][0]  # the other task is untouched


def test_threshold_by_false_alarm_rate_reads_the_held_out_scores(model, capsys):
    calibration = _manifest(model)["tasks"][0]["calibration"]
    assert len(calibration) >= 4  # the smoke config holds out 2 folds of 30 % of 10 training images
    assert main(["--quiet", "threshold", str(model), "--task", "0", "--false-alarm-rate", "0.25"]) == 0
    entry = _manifest(model)["tasks"][0]
    assert entry["threshold"] in calibration  # one of the held-out scores
    assert np.mean(np.asarray(calibration) > entry["threshold"]) <= 0.25
    assert "false-alarm rate 0.25" in entry["threshold_log"][-1]["how"]


@pytest.mark.parametrize("args, said", [
    (["--task", "screw", "--value", "1"], "no single task is named 'screw'"),
    (["--task", "0", "--value", "nan"], "finite number"),
    (["--task", "0", "--false-alarm-rate", "1.5"], "strictly between 0 and 1"),
])
def test_threshold_refuses_bad_requests_with_one_line(model, capsys, args, said):
    before = (model / "manifest.json").read_bytes()
    assert main(["--quiet", "threshold", str(model), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and said in err
    assert (model / "manifest.json").read_bytes() == before


def test_the_service_picks_a_threshold_change_up_as_a_new_generation(model):
    slot = ModelSlot(model)
    assert slot.refresh().generation == 1
    assert main(["--quiet", "threshold", str(model), "--task", "bottle", "--value", "123.5"]) == 0
    loaded = slot.refresh()
    assert loaded.generation == 2 and loaded.detector.tasks[0].threshold == 123.5


def test_verify_lists_every_check_and_names_the_failing_file(model, capsys):
    assert main(["--quiet", "verify", str(model)]) == 0
    out = capsys.readouterr().out
    assert "verify: all" in out and "task_001.safetensors: task 1 (grid), sha256 matches" in out
    data = bytearray((model / "task_001.safetensors").read_bytes())
    data[-5] ^= 1
    (model / "task_001.safetensors").write_bytes(bytes(data))
    assert main(["--quiet", "verify", str(model)]) == 2
    lines = capsys.readouterr().out.splitlines()
    failed = [line for line in lines if line.startswith("FAIL")]
    assert len(failed) == 1 and "task_001.safetensors" in failed[0]
    assert any(line.startswith("ok") and "task_000.safetensors" in line for line in lines)


def test_an_unsealed_manifest_loads_and_verify_seal_protects_it(model, capsys):
    m = _manifest(model)
    m.pop("digest")
    (model / "manifest.json").write_text(json.dumps(m, indent=2))  # as written before manifests were sealed
    assert len(Detector.load(model).tasks) == 2
    assert main(["--quiet", "verify", str(model), "--seal"]) == 0
    assert "sealed now" in capsys.readouterr().out
    sealed = _manifest(model)
    assert seal_problem(sealed) is None
    sealed["tasks"][0]["threshold"] += 1.0  # a hand edit after sealing
    (model / "manifest.json").write_text(json.dumps(sealed, indent=2))
    assert main(["--quiet", "verify", str(model)]) == 2
    assert "does not match its digest" in capsys.readouterr().out
