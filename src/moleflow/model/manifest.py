"""A model directory's manifest.json: what each task is, and the sha256 of every file, sealed by a digest.

Reading checks, in this order, and refuses with one line naming the file and what to do:
- the digest of the manifest's own content (integrity.py): a hand edit or a flipped byte is refused;
  a manifest written before manifests were sealed loads with a warning (`moleflow verify --seal`);
- every value the scorer uses: thresholds and map floors finite numbers, classes strings, task indices
  0, 1, … in order, file names plain names inside the folder, digests 64 hex characters.
Thresholds are changed the supported way by `set_threshold` (`moleflow threshold`), which records the
old and the new value, how and when, and seals the manifest again.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Iterator

import numpy as np

from moleflow.atomic import atomic_write_text
from moleflow.integrity import is_sha256, plain_name, read_document, seal_problem, sealed_json

FORMAT = "moleflow-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
log = logging.getLogger("moleflow.model")
_WARNED: set[str] = set()  # unsealed manifests already warned about in this process


class CheckpointError(RuntimeError):
    """A model directory that cannot be loaded; the message names the file and the reason."""


@dataclass
class TaskRecord:
    index: int
    classes: list[str]
    threshold: float  # image-score decision threshold (see threshold_log for how it was set)
    specs: list[str] = field(default_factory=list)  # class specs as configured ("elpv:mono")
    map_low: float = 0.0  # 1st percentile of training patch scores: the bottom of the map colour scale
    file: str = ""
    sha256: str = ""
    calibration: list[float] = field(default_factory=list)  # the held-out good image scores behind the threshold
    threshold_log: list[dict] = field(default_factory=list)  # changes by `moleflow threshold`: old, new, how, when

    @classmethod
    def from_entry(cls, e: dict) -> TaskRecord:
        """The record of a manifest (or journal) task entry (checked by `check_task_entry` first)."""
        return cls(e["index"], list(e["classes"]), float(e["threshold"]), list(e["specs"]), float(e["map_low"]),
                   e["file"], e["sha256"], [float(v) for v in e.get("calibration", [])], list(e.get("threshold_log", [])))

    def to_entry(self) -> dict:
        return {"index": self.index, "classes": self.classes, "specs": self.specs or self.classes,
                "threshold": self.threshold, "map_low": self.map_low, "file": self.file, "sha256": self.sha256,
                "calibration": self.calibration, "threshold_log": self.threshold_log}


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _strings(value: object) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(v, str) for v in value)


def check_file_entry(entry: object, what: str) -> str | None:
    """Why a manifest's file entry ({"file", "sha256"}) is not usable, or None."""
    if not isinstance(entry, dict):
        return f"{what} is not an entry with a file and its sha256"
    if not plain_name(entry.get("file")) or not str(entry.get("file")).endswith(".safetensors"):
        return f"{what}'s file {entry.get('file')!r} is not a plain .safetensors name inside the model folder"
    if not is_sha256(entry.get("sha256")):
        return f"{what}'s sha256 {entry.get('sha256')!r} is not 64 hex characters"
    return None


def check_task_entry(entry: object, position: int) -> str | None:
    """Why a task entry is not usable (the first problem), or None."""
    what = f"task {position}"
    if not isinstance(entry, dict):
        return f"{what} is not a task entry"
    if entry.get("index") != position or isinstance(entry.get("index"), bool):
        return f"{what}'s index is {entry.get('index')!r}; tasks are numbered 0, 1, … in order"
    if not _strings(entry.get("classes")) or not _strings(entry.get("specs")):
        return f"{what}'s classes and specs must be non-empty lists of names"
    for key in ("threshold", "map_low"):
        if not _finite(entry.get(key)):
            return f"{what}'s {key} is {entry.get(key)!r}, not a finite number"
    calibration = entry.get("calibration", [])
    if not isinstance(calibration, list) or not all(_finite(v) for v in calibration):
        return f"{what}'s calibration scores must be a list of finite numbers"
    return check_file_entry(entry, what)


def _refuse(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}; it was damaged or edited by hand: restore it from a copy, or retrain "
                           "(change thresholds with `moleflow threshold`)")


def _check_values(path: Path, manifest: dict) -> None:
    problem = check_file_entry(manifest.get("shared"), "the shared flow")
    tasks = manifest.get("tasks")
    if problem is None and (not isinstance(tasks, list) or not tasks):
        problem = "it lists no tasks"
    for i, entry in enumerate(tasks if problem is None else []):
        problem = problem or check_task_entry(entry, i)
    if problem is None and not all(isinstance(manifest.get(k), dict) for k in ("config", "backbone")):
        problem = "its config or backbone is not a mapping"
    if problem is not None:
        raise _refuse(path, problem)


def load_manifest_json(model_dir: Path) -> dict:
    """The parsed manifest.json of `model_dir`, format checked; its digest and values not yet."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is not a model directory (it does not exist); give the 'model' folder of a run")
    if not path.is_file():
        raise CheckpointError(f"{model_dir} is not a model directory: {MANIFEST} is missing; give the 'model' folder of a run")
    manifest, problem = read_document(path, FORMAT, FORMAT_VERSION, "moleflow manifest")
    if problem is not None:
        raise CheckpointError(f"{path} {problem}")
    return manifest


def read_verified(model_dir: Path, allow_unsealed: bool = True) -> dict:
    """The manifest of `model_dir` after checking its digest and its values (CheckpointError otherwise).
    An unsealed manifest (written before manifests carried a digest) loads with a warning."""
    path = Path(model_dir) / MANIFEST
    manifest = load_manifest_json(model_dir)
    problem = seal_problem(manifest)
    unsealed = problem == "no digest" and allow_unsealed
    if problem is not None and not unsealed:
        raise _refuse(path, f"it has {problem}")
    _check_values(path, manifest)
    if unsealed and str(path) not in _WARNED:
        _WARNED.add(str(path))
        log.warning("%s has no digest (written before moleflow sealed its manifests): hand edits cannot be detected; "
                    "`moleflow verify %s --seal` checks it and adds one", path, model_dir)
    return manifest


@contextlib.contextmanager
def writer_lock(model_dir: Path) -> Iterator[None]:
    """One writer of `model_dir`'s manifest at a time (add-task, `moleflow threshold`): each reads the
    manifest, changes it and writes it, and two at once would lose one change. Readers need no lock."""
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(model_dir) / ".manifest.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_sealed(model_dir: Path, manifest: dict) -> dict:
    """Write `manifest` (its values checked) with its digest, atomically; returns what was written."""
    _check_values(Path(model_dir) / MANIFEST, manifest)
    text = sealed_json(manifest)
    atomic_write_text(Path(model_dir) / MANIFEST, text)
    return json.loads(text)


def find_task(manifest: dict, name: str) -> int:
    """The index of the task named `name`: its index, or one of its class names or specs."""
    tasks = manifest["tasks"]
    if name.isdigit() and int(name) < len(tasks):
        return int(name)
    hits = [t["index"] for t in tasks if name in t["classes"] or name in t["specs"]]
    if len(hits) != 1:
        known = ", ".join(f"{t['index']} ({'+'.join(t['classes'])})" for t in tasks)
        raise CheckpointError(f"no single task is named {name!r} in this model; its tasks: {known}")
    return hits[0]


def threshold_for_rate(record: TaskRecord, rate: float) -> float:
    """The threshold that calls at most a share `rate` of the task's held-out good calibration scores
    defective: one of those scores ("higher" quantile; a linear one can land below the rate's share)."""
    if not 0.0 < rate < 1.0:
        raise CheckpointError(f"a false-alarm rate must lie strictly between 0 and 1, not {rate}")
    if not record.calibration:
        raise CheckpointError(f"task {record.index} ({'+'.join(record.classes)}) has no stored calibration scores "
                              "(trained before moleflow stored them): set --value, or train the task again")
    return float(np.quantile(np.asarray(record.calibration, dtype=np.float64), 1.0 - rate, method="higher"))


def set_threshold(model_dir: Path, index: int, value: float, how: str) -> tuple[float, dict]:
    """Set task `index`'s threshold to `value` in the sealed manifest (atomically), recording the change;
    returns (the old value, the manifest written)."""
    if not math.isfinite(value):
        raise CheckpointError(f"a threshold must be a finite number, not {value}")
    with writer_lock(model_dir):
        manifest = read_verified(model_dir)
        entry = manifest["tasks"][index]
        old = float(entry["threshold"])
        when = datetime.now(timezone.utc).isoformat(timespec="seconds")
        entry["threshold_log"] = [*entry.get("threshold_log", []), {"old": old, "new": float(value), "how": how, "when": when}]
        entry["threshold"] = float(value)
        return old, write_sealed(model_dir, manifest)
