"""Learning tasks side by side on a local Ray cluster (`--ray`), and scoring with Ray Data.

The cluster is this machine's: `ray.init(num_cpus=2)`, two one-thread workers. The sequential
reference runs on one thread too (as `OMP_NUM_THREADS=1 moleflow fit` does), so every task file must be
byte-identical and every metric equal.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_limits

ray = pytest.importorskip("ray", reason="Ray is the optional extra moleflow[ray] (make install includes it)")

from moleflow.cli import main  # noqa: E402
from moleflow.config import load_config  # noqa: E402
from moleflow.continual.jobs import run_add_task, run_fit, run_fit_parallel  # noqa: E402
from moleflow.continual.parallel import FAULT_GATE  # noqa: E402
from moleflow.predict import run_predict  # noqa: E402

from helpers import CONFIGS, write_striped_class  # noqa: E402

CLASSES = {"bottle": (200, 60, 40), "grid": (40, 90, 210), "screw": (60, 200, 60), "cable": (200, 200, 60)}


@pytest.fixture(scope="module")
def gate(tmp_path_factory) -> Path:
    """The workers' fault gate (continual/parallel.py): a worker waits while `hold` exists in it."""
    return tmp_path_factory.mktemp("gate")


@pytest.fixture(scope="module")
def cluster(gate):
    """A local Ray cluster of 2 CPU slots for this module; its address for other processes. Its workers
    inherit the fault gate's folder from this process's environment."""
    os.environ[FAULT_GATE] = str(gate)
    ctx = ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ctx.address_info["address"]
    ray.shutdown()
    os.environ.pop(FAULT_GATE, None)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for i, (name, colour) in enumerate(CLASSES.items()):
        write_striped_class(root, name, colour, seed=i + 1)
    return root


def _overrides(data: Path, epochs: int = 2) -> list[str]:
    return [f"data.root={data}", "scenario.tasks=[[bottle],[grid],[screw],[cable]]", f"train.epochs={epochs}", "output.plots=false"]


def _one_thread(fn, *args, **kwargs):
    """Run fn on one thread (torch's and NumPy's BLAS), as a Ray worker with one CPU computes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _files(model: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model.glob("*.safetensors"))}


def _results(run: Path) -> dict:
    """results.json without the wall-clock figures (the only part that may differ)."""
    r = json.loads((run / "results.json").read_text())
    r.pop("timings")
    for s in r["steps"]:
        s["train"].pop("seconds")
        s["train"].pop("calibration_seconds", None)
    return r


@pytest.fixture(scope="module")
def sequential(data, tmp_path_factory) -> Path:
    """The sequential reference, as the issue states it: `OMP_NUM_THREADS=1 moleflow fit`."""
    out = tmp_path_factory.mktemp("seq")
    subprocess.run([sys.executable, "-m", "moleflow.cli", "--quiet", "fit", str(CONFIGS / "smoke.yaml"), *_overrides(data, epochs=30),
                    "--out", str(out)], check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out


def test_parallel_fit_writes_the_sequential_files_byte_for_byte(cluster, data, sequential, tmp_path):
    lines: list[str] = []  # the driver evaluates on one thread too: float sums depend on the thread count
    _one_thread(run_fit_parallel, load_config(CONFIGS / "smoke.yaml", _overrides(data, epochs=30)), tmp_path, "local",
                progress=False, echo=lines.append)
    assert sum("learned in" in x for x in lines) == 4
    assert _files(tmp_path / "model") == _files(sequential / "model")
    assert len(_files(sequential / "model")) == 5  # shared + 4 tasks
    assert json.loads((tmp_path / "model/manifest.json").read_text()) == json.loads((sequential / "model/manifest.json").read_text())
    assert _results(tmp_path) == _results(sequential)  # every step's metrics, routing and training losses
    assert not (tmp_path / "model/pending.json").exists()


def test_killed_parallel_fit_keeps_written_tasks_and_resumes(cluster, gate, data, sequential, tmp_path):
    """The driver is killed when the test chooses: tasks 0-2 journaled, task 3's worker held at the gate."""
    _arm(gate, "hold-3")
    cmd = [sys.executable, "-m", "moleflow.cli", "--quiet", "fit", str(CONFIGS / "smoke.yaml"), *_overrides(data, epochs=30),
           "--out", str(tmp_path), "--ray", cluster]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    journal = tmp_path / "model" / "pending.json"

    def journaled() -> list[int]:
        return sorted(e["index"] for e in json.loads(journal.read_text())["tasks"]) if journal.is_file() else []

    try:
        _wait_for(lambda: journaled() == [0, 1, 2] and any(w.read_text() == "3" for w in gate.glob("worker-*")), proc,
                  "tasks 0-2 were written while task 3 waits")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        (gate / "hold-3").unlink(missing_ok=True)
    written = journaled()
    assert written == [0, 1, 2]
    assert not (tmp_path / "model/manifest.json").exists()  # the manifest switches only at the end
    stamps = {t: (tmp_path / f"model/task_{t:03d}.safetensors").stat().st_mtime_ns for t in written}

    lines: list[str] = []
    _one_thread(run_fit_parallel, load_config(CONFIGS / "smoke.yaml", _overrides(data, epochs=30)), tmp_path, cluster,
                progress=False, echo=lines.append, resume=True)
    assert sorted(int(x.split()[1]) for x in lines if "kept from the interrupted run" in x) == sorted(written)
    assert {t: (tmp_path / f"model/task_{t:03d}.safetensors").stat().st_mtime_ns for t in written} == stamps  # not rewritten
    assert _files(tmp_path / "model") == _files(sequential / "model")
    assert _results(tmp_path)["steps"] == _results(sequential)["steps"]


def test_parallel_add_task_equals_sequential(cluster, data, tmp_path):
    cfg = load_config(CONFIGS / "smoke.yaml", [f"data.root={data}", "scenario.tasks=[[bottle]]", "train.epochs=2", "output.plots=false"])
    quiet = {"progress": False, "echo": lambda _: None}
    for name in ("seq", "par"):
        _one_thread(run_fit, cfg, tmp_path / name, **quiet)
    new = [["mvtec:grid"], ["mvtec:screw", "mvtec:cable"]]  # two new tasks, the second of two classes
    _one_thread(run_add_task, tmp_path / "seq/model", new, {}, None, **quiet)
    _one_thread(run_add_task, tmp_path / "par/model", new, {}, None, ray="local", **quiet)
    assert _files(tmp_path / "par/model") == _files(tmp_path / "seq/model")
    assert [t["classes"] for t in json.loads((tmp_path / "par/model/manifest.json").read_text())["tasks"]] == [
        ["bottle"], ["grid"], ["screw", "cable"]]
    assert _results(tmp_path / "par") == _results(tmp_path / "seq")


def test_add_task_cli_commas_separate_tasks(cluster, data, tmp_path):
    assert main(["--quiet", "fit", str(CONFIGS / "smoke.yaml"), f"data.root={data}", "scenario.tasks=[[bottle]]", "train.epochs=1",
                 "--no-plots", "--out", str(tmp_path)]) == 0
    assert main(["--quiet", "add-task", str(tmp_path / "model"), "--dataset", "mvtec", "--root", str(data),
                 "--classes", "grid,screw", "cable", "--ray"]) == 0
    tasks = json.loads((tmp_path / "model/manifest.json").read_text())["tasks"]
    assert [t["classes"] for t in tasks] == [["bottle"], ["grid"], ["screw", "cable"]]
    assert [s["after_task"] for s in json.loads((tmp_path / "results.json").read_text())["steps"]] == [0, 1, 2]


def test_predict_on_ray_data_writes_the_local_predictions(cluster, data, sequential, tmp_path):
    images = [data / c / "test" for c in CLASSES]
    n = _one_thread(run_predict, sequential / "model", images, tmp_path / "local", progress=False)[0]
    assert run_predict(sequential / "model", images, tmp_path / "ray", progress=False, batch_size=8, ray="local")[0] == n == 32
    assert (tmp_path / "ray/predictions.jsonl").read_text() == (tmp_path / "local/predictions.jsonl").read_text()
    maps = sorted(p.name for p in (tmp_path / "local/maps").iterdir())
    assert maps and maps == sorted(p.name for p in (tmp_path / "ray/maps").iterdir())
    assert all((tmp_path / "ray/maps" / m).read_bytes() == (tmp_path / "local/maps" / m).read_bytes() for m in maps)


def test_ray_refuses_a_baseline_method(data, tmp_path, capsys):
    assert main(["--quiet", "fit", str(CONFIGS / "smoke.yaml"), *_overrides(data), "method=finetune", "--out", str(tmp_path),
                 "--ray"]) == 2
    assert "method: moleflow" in capsys.readouterr().err


def test_ray_missing_says_how_to_install(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as without the extra
    assert main(["--quiet", "fit", str(CONFIGS / "smoke.yaml"), *_overrides(data), "--out", str(tmp_path), "--ray"]) == 2
    assert "pip install 'moleflow[ray]'" in capsys.readouterr().err


def test_detector_add_task_on_ray(cluster, data, tmp_path):
    from moleflow import Detector

    cfg = load_config(CONFIGS / "smoke.yaml", [f"data.root={data}", "scenario.tasks=[[bottle]]", "train.epochs=1", "output.plots=false"])
    run_fit(cfg, tmp_path, progress=False, echo=lambda _: None)
    det = Detector.load(tmp_path / "model")
    det.add_task(["grid"], dataset="mvtec", root=data, ray="local")
    assert [t.classes for t in det.tasks] == [["bottle"], ["grid"]]
    assert det.predict(data / "grid/test/good/000.png").classes == ("grid",)


def _arm(gate: Path, hold: str) -> None:
    """Close the workers' gate `hold`, with no worker files left from an earlier test."""
    for f in gate.glob("worker-*"):
        f.unlink()
    (gate / hold).touch()


def _wait_for(condition, proc: subprocess.Popen, what: str) -> None:
    """Until `condition()` holds; fails only if the run ends first (or after 30 minutes: a hang)."""
    stop = time.monotonic() + 1800
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < stop, f"hung waiting for {what}"
        time.sleep(0.05)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="kills a worker with SIGKILL (POSIX)")
def test_a_worker_killed_mid_task_is_retried_to_the_same_files(cluster, gate, data, sequential, tmp_path):
    """The test decides when the worker dies: later tasks' workers wait at the gate until it is opened,
    one of them is killed there, then the gate opens and Ray retries the killed task."""
    _arm(gate, "hold")
    cmd = [sys.executable, "-m", "moleflow.cli", "--quiet", "fit", str(CONFIGS / "smoke.yaml"), *_overrides(data, epochs=30),
           "--out", str(tmp_path), "--ray", cluster]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _wait_for(lambda: list(gate.glob("worker-*")), proc, "a later task's worker reached the gate")
        victim = sorted(gate.glob("worker-*"))[0]
        pid = int(victim.name.removeprefix("worker-"))
        os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: not Path(f"/proc/{pid}").exists() or b"zombie" in _status(pid), proc, "the worker died")
    finally:
        (gate / "hold").unlink(missing_ok=True)  # the retried task and the others go on
    _, err = proc.communicate(timeout=1800)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert _files(tmp_path / "model") == _files(sequential / "model")  # the retried task, too, byte for byte


def _status(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/status").read_bytes().lower()
    except OSError:
        return b"zombie"


def test_a_user_error_in_a_worker_is_one_line(cluster, data, sequential, tmp_path, capsys):
    model = Path(shutil.copytree(sequential / "model", tmp_path / "model"))
    before = _files(model)
    assert main(["--quiet", "add-task", str(model), "--dataset", "mvtec", "--root", str(data), "--classes", "nosuch,other",
                 "--ray", cluster]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moleflow add-task: error:") and "Traceback" not in err, err
    assert "no folder nosuch" in err or "no folder other" in err, err  # whichever worker failed first
    assert _files(model) == before and not (model / "pending.json").exists()  # nothing learned, nothing written
