"""Saving and loading models: safetensors files and a manifest with checksums, written atomically.

    model/
      manifest.json          config, backbone identity, dimensions, and for every file its sha256
      shared.safetensors     the shared flow (written with task 0, never rewritten while it is unchanged)
      task_000.safetensors   task 0's modules + its router prototype + its score threshold
      task_001.safetensors   ...

A new task writes its own file and then replaces manifest.json by an atomic rename, so a reader sees
the model before or after the new task, never a mix, and earlier task files stay byte-identical.
A file whose content changes (the finetune baseline retrains shared and task 0) is written under a
new name (shared.<sha256[:12]>.safetensors) and the old one is removed only after the manifest
switched: a process killed in between leaves the previous model complete.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from moleflow.atomic import atomic_write_bytes, atomic_write_text
from moleflow.features.backbone import DESCRIPTOR
from moleflow.integrity import sha256_bytes
from moleflow.model.manifest import (  # noqa: F401 - the model directory's names, used as checkpoint.X
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    CheckpointError,
    TaskRecord,
    check_file_entry,
    check_task_entry,
    read_verified,
    write_sealed,
    writer_lock,
)

PENDING = "pending.json"  # tasks written by a parallel run whose manifest has not switched yet


def _tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return st_save(clean, metadata=metadata)


def _task_bytes(rec: TaskRecord, tensors: dict[str, torch.Tensor]) -> bytes:
    """A task file's content: its tensors and its class names (the one definition of its bytes)."""
    return _tensor_bytes(tensors, {"classes": json.dumps(rec.classes)})


def read_manifest(model_dir: Path) -> dict:
    """The verified manifest of `model_dir` (manifest.py), upgraded to today's keys."""
    return _upgraded(read_verified(model_dir))


# The descriptor's name before `backbone.local_avg_at` existed; it is the same computation as DESCRIPTOR
# with local_avg_at "merged", the only order there was.
_DESCRIPTOR_BEFORE_LOCAL_AVG_AT = "mean+log_rms"


def _upgraded(manifest: dict) -> dict:
    """A model saved before `backbone.local_avg_at` existed averaged on the merged grid: say so, in its
    config and its backbone identity, so it loads (and `add-task` extends it) with the features it was
    trained on rather than with today's default."""
    ident = manifest.get("backbone")
    if isinstance(ident, dict) and "local_avg_at" not in ident:
        ident["local_avg_at"] = "merged"
        if ident.get("descriptor") == _DESCRIPTOR_BEFORE_LOCAL_AVG_AT:
            ident["descriptor"] = DESCRIPTOR
        backbone_cfg = manifest.get("config", {}).get("backbone")
        if isinstance(backbone_cfg, dict):
            backbone_cfg.setdefault("local_avg_at", "merged")
    return manifest


def read_checked(model_dir: Path, entry: dict) -> dict[str, torch.Tensor]:
    """Load one safetensors file of the manifest after checking its sha256."""
    problem = check_file_entry(entry, "an entry")
    if problem is not None:
        raise CheckpointError(f"{Path(model_dir) / MANIFEST}: {problem}")
    path = Path(model_dir) / entry["file"]
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (listed in {MANIFEST})")
    data = path.read_bytes()
    digest = sha256_bytes(data)
    if digest != entry["sha256"]:
        raise CheckpointError(
            f"{path} is damaged or was altered: its sha256 {digest[:12]}… differs from the manifest's {entry['sha256'][:12]}…"
        )
    try:
        return st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path} cannot be read as safetensors: {exc}") from None


def write_model(
    model_dir: Path,
    *,
    config: dict,
    backbone: dict,
    channels: int,
    grid: tuple[int, int],
    shared: dict[str, torch.Tensor],
    tasks: list[TaskRecord],
    task_tensors: dict[int, dict[str, torch.Tensor]],
    extra: dict | None = None,
) -> dict:
    """Write the files that changed, then the manifest (atomically). Returns the manifest.

    `task_tensors` holds the tensors of the tasks to (re)write; a task missing from it must already be
    on disk under the previous manifest and is kept as it is, byte for byte.
    """
    model_dir = Path(model_dir)
    with writer_lock(model_dir):
        return _write_model_locked(model_dir, config, backbone, channels, grid, shared, tasks, task_tensors, extra or {})


def _write_model_locked(model_dir: Path, config: dict, backbone: dict, channels: int, grid: tuple[int, int],
                        shared: dict[str, torch.Tensor], tasks: list[TaskRecord],
                        task_tensors: dict[int, dict[str, torch.Tensor]], extra: dict) -> dict:
    old = read_manifest(model_dir) if (model_dir / MANIFEST).exists() else None
    old_tasks = {t["index"]: t for t in old["tasks"]} if old else {}

    shared_bytes = _tensor_bytes(shared)
    shared_entry = _write_unless_unchanged(model_dir, "shared", shared_bytes, old["shared"] if old else None)

    entries = []
    for rec in tasks:
        if rec.index in task_tensors:
            data = _task_bytes(rec, task_tensors[rec.index])
            written = _write_unless_unchanged(model_dir, f"task_{rec.index:03d}", data, old_tasks.get(rec.index))
            rec.file, rec.sha256 = written["file"], written["sha256"]
        else:
            prev = old_tasks.get(rec.index)
            if prev is not None:
                rec.file, rec.sha256 = prev["file"], prev["sha256"]
            elif not (rec.file and (model_dir / rec.file).is_file()):  # written before by `write_task_file`
                raise CheckpointError(f"task {rec.index} has neither new tensors nor a file in {model_dir}")
        entries.append(rec.to_entry())

    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": config,
        "backbone": backbone,
        "channels": channels,
        "grid": list(grid),
        "shared": shared_entry,
        "tasks": entries,
        **extra,
    }
    manifest = write_sealed(model_dir, manifest)
    if old:  # files the new manifest no longer lists (replaced versions); readers of the old one may retry
        listed = {shared_entry["file"], *(e["file"] for e in entries)}
        for entry in [old["shared"], *old["tasks"]]:
            if entry["file"] not in listed:
                (model_dir / entry["file"]).unlink(missing_ok=True)
    return manifest


def write_task_file(model_dir: Path, rec: TaskRecord, tensors: dict[str, torch.Tensor]) -> None:
    """Write a new task's file (the bytes `write_model` would write) ahead of the manifest, and set
    `rec.file` / `rec.sha256`; a later `write_model` listing `rec` without tensors keeps the file."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    data = _task_bytes(rec, tensors)
    rec.file, rec.sha256 = f"task_{rec.index:03d}.safetensors", sha256_bytes(data)
    atomic_write_bytes(model_dir / rec.file, data)


def write_shared_file(model_dir: Path, shared: dict[str, torch.Tensor]) -> dict:
    """Write a new model's shared flow ahead of the manifest (the bytes `write_model` writes); its entry."""
    data = _tensor_bytes(shared)
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(model_dir) / "shared.safetensors", data)
    return {"file": "shared.safetensors", "sha256": sha256_bytes(data)}


def read_pending(model_dir: Path) -> dict | None:
    """The journal of a parallel run that was stopped before its manifest switched, or None."""
    path = Path(model_dir) / PENDING
    if not path.is_file():
        return None
    try:
        journal = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt ({exc}); delete it to start the parallel run's tasks over") from None
    entries = journal.get("tasks", []) if isinstance(journal, dict) else None
    problems = ["it is not a journal"] if not isinstance(entries, list) else []
    problems += [p for e in entries or [] if (p := check_task_entry(e, e.get("index") if isinstance(e, dict) else -1))]
    if problems:
        raise CheckpointError(f"{path}: {problems[0]}; delete it to start the parallel run's tasks over")
    return journal


def write_pending(model_dir: Path, journal: dict) -> None:
    atomic_write_text(Path(model_dir) / PENDING, json.dumps(journal, indent=2))


def clear_pending(model_dir: Path) -> None:
    (Path(model_dir) / PENDING).unlink(missing_ok=True)


def _write_unless_unchanged(model_dir: Path, stem: str, data: bytes, prev: dict | None) -> dict:
    """The manifest entry for `data`; writes the file unless `prev` already holds these bytes.

    A first version is `<stem>.safetensors`; a changed version gets its own name, so the file the
    current manifest lists is never overwritten.
    """
    digest = sha256_bytes(data)
    if prev and prev["sha256"] == digest and (model_dir / prev["file"]).is_file():
        return {"file": prev["file"], "sha256": digest}
    name = f"{stem}.safetensors" if prev is None else f"{stem}.{digest[:12]}.safetensors"
    atomic_write_bytes(model_dir / name, data)
    return {"file": name, "sha256": digest}
