"""A process that dies at any point of saving leaves a loadable model (issue 8, interrupted runs).

Each case runs the command in a child process that calls os._exit at its k-th os.replace, the rename
that ends every atomic write: a death at that instant, as SIGKILL would cause, with the temporary file
fully written and left behind. Every write of add-task is hit in turn (task file, manifest, results),
and every write of the finetune baseline's second save. Afterwards the model directory must load with
the tasks of before or after the command, every listed file verifying, and running the command again
must succeed.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from moleflow.model import checkpoint
from moleflow.cli import main
from moleflow.continual.system import load_system

from helpers import CONFIGS, write_striped_class

DIE_AT = r"""
import atexit, json, os, sys
point, k = sys.argv[1], int(sys.argv[2])
real, calls = getattr(os, point), []
def hook(*args, **kwargs):
    calls.append(str(args[-1]))
    if len(calls) == k:
        os._exit(137)  # no cleanup, no finally blocks: like SIGKILL at this instant
    return real(*args, **kwargs)
setattr(os, point, hook)
atexit.register(lambda: print("CALLS " + json.dumps(calls)))
from moleflow.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _run(point: str, k: int, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DIE_AT, point, str(k), "--quiet", *argv],
                          capture_output=True, text=True, timeout=300)


def _calls(argv: list[str], point: str) -> list[str]:
    """The paths the command passes to os.`point`, in order."""
    done = _run(point, 10**9, argv)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.split("CALLS ")[-1])


def _check_loadable(model_dir: Path) -> int:
    manifest = checkpoint.read_manifest(model_dir)
    for entry in [manifest["shared"], *manifest["tasks"]]:
        checkpoint.read_checked(model_dir, entry)  # raises on a missing or altered file
    return len(load_system(model_dir).tasks)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("data")
    write_striped_class(r, "bottle", (200, 60, 40), seed=1)
    write_striped_class(r, "grid", (40, 90, 210), seed=2)
    write_striped_class(r, "screw", (60, 200, 60), seed=3)
    return r


def _fit(root: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", str(CONFIGS / "smoke.yaml"), f"data.root={root}", "scenario.tasks=[[bottle],[grid]]",
            "output.plots=false", *extra, "--out", str(out)]


def _add(model: Path, root: Path) -> list[str]:
    return ["add-task", str(model), "--dataset", "mvtec", "--root", str(root), "--classes", "screw"]


def test_add_task_killed_at_every_write(root, tmp_path):
    base = tmp_path / "base"
    assert main(["--quiet", *_fit(root, base)]) == 0
    old_files = {p.name: p.read_bytes() for p in (base / "model").glob("*.safetensors")}
    counted = tmp_path / "count"
    subprocess.run(["cp", "-r", str(base), str(counted)], check=True)
    writes = _calls(_add(counted / "model", root), "replace")
    assert any("task_002" in w for w in writes) and any(w.endswith("manifest.json") for w in writes)
    outcomes = []
    for k in range(1, len(writes) + 1):
        run = tmp_path / f"replace{k}"
        subprocess.run(["cp", "-r", str(base), str(run)], check=True)
        died = _run("replace", k, _add(run / "model", root))
        assert died.returncode == 137, (k, died.stderr)
        tasks = _check_loadable(run / "model")
        assert tasks in (2, 3), (writes[k - 1], tasks)
        outcomes.append(tasks)
        for name, data in old_files.items():  # earlier tasks' files are never touched
            assert (run / "model" / name).read_bytes() == data
        if tasks == 2:  # the add did not land: running it again works, stale temporary files or not
            assert main(["--quiet", *_add(run / "model", root)]) == 0
            assert _check_loadable(run / "model") == 3
    assert 2 in outcomes and 3 in outcomes  # deaths before and after the manifest switched were both hit


def test_finetune_killed_while_saving_its_retrained_weights(root, tmp_path):
    """The finetune baseline rewrites shared and task 0 after each task; a death during that save
    leaves the previous version complete (new versions go to new file names)."""
    writes = _calls(_fit(root, tmp_path / "count", "method=finetune"), "replace")
    manifests = [i for i, w in enumerate(writes) if w.endswith("manifest.json")]
    assert len(manifests) == 2  # one save per scenario task
    second_save = range(manifests[0] + 2, manifests[1] + 2)  # 1-based: the writes after the first manifest
    assert any("shared." in writes[k - 1] for k in second_save)  # the retrained shared weights are among them
    for k in second_save:
        run = tmp_path / f"replace{k}"
        died = _run("replace", k, _fit(root, run, "method=finetune"))
        assert died.returncode == 137
        assert _check_loadable(run / "model") == 1
    final = checkpoint.read_manifest(tmp_path / "count" / "model")
    files = sorted(p.name for p in (tmp_path / "count" / "model").glob("*.safetensors"))
    assert files == sorted([final["shared"]["file"], final["tasks"][0]["file"]])  # replaced versions are gone
