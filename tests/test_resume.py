"""Interrupted runs and determinism: a fit killed mid-task resumes to the same results."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moleflow.cli import main

from helpers import CONFIGS, write_striped_class

METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro", "routing_accuracy")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("data")
    write_striped_class(r, "bottle", (200, 60, 40), seed=1)
    write_striped_class(r, "grid", (40, 90, 210), seed=2)
    return r


def _args(root, out):
    return [str(CONFIGS / "smoke.yaml"), f"data.root={root}", "scenario.tasks=[[bottle],[grid]]", "train.epochs=3", "--out", str(out)]


def _metrics(run: Path) -> list:
    r = json.loads((run / "results.json").read_text())
    return [[{k: e[k] for k in METRICS} for e in s["per_task"]] for s in r["steps"]]


def test_same_seed_same_results(root, tmp_path):
    assert main(["--quiet", "fit", *_args(root, tmp_path / "a")]) == 0
    assert main(["--quiet", "fit", *_args(root, tmp_path / "b")]) == 0
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    ra = json.loads((tmp_path / "a/results.json").read_text())
    rb = json.loads((tmp_path / "b/results.json").read_text())
    assert [s["train"]["epoch_loss"] for s in ra["steps"]] == [s["train"]["epoch_loss"] for s in rb["steps"]]


def test_killed_fit_resumes_to_the_same_results(root, tmp_path):
    ref = tmp_path / "ref"
    assert main(["--quiet", "fit", *_args(root, ref)]) == 0

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "moleflow.cli", "--quiet", "fit", *_args(root, run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = run / "model" / "manifest.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if manifest.is_file() and len(json.loads(manifest.read_text())["tasks"]) == 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)  # mid task 1: task 0 is saved, task 1 is not
    proc.wait()
    assert len(json.loads(manifest.read_text())["tasks"]) == 1
    assert not list((run / "model").glob("*.tmp"))  # no half-written file became part of the model

    # the completed task is loadable on its own
    assert main(["--quiet", "evaluate", str(run / "model"), "--out", str(tmp_path / "eval")]) == 0
    # and --resume ends where the uninterrupted run ended
    assert main(["--quiet", "fit", *_args(root, run), "--resume"]) == 0
    assert _metrics(run) == _metrics(ref)
    assert (run / "model/task_001.safetensors").read_bytes() == (ref / "model/task_001.safetensors").read_bytes()


def test_resume_refuses_another_config(root, tmp_path):
    assert main(["--quiet", "fit", *_args(root, tmp_path)]) == 0
    assert main(["--quiet", "fit", *_args(root, tmp_path), "train.lr=0.5", "--resume"]) == 2
