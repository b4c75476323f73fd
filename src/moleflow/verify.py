"""`moleflow verify MODEL [--export DIR] [--seal]`: check every file of a model (and of an export of it)
against the digests recorded when it was written, and say what was checked and what failed.

The checks are the ones loading does (model/manifest.py, model/checkpoint.py, export.py), run to the
end instead of stopping at the first problem, so one run lists everything that is wrong. `--seal` adds
a digest to a manifest written before manifests carried one, after every other check passed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moleflow.continual.system import load_system
from moleflow.export import checked_export
from moleflow.integrity import seal_problem
from moleflow.model import checkpoint, manifest as manifest_io
from moleflow.model.manifest import CheckpointError


@dataclass(frozen=True)
class Check:
    ok: bool
    what: str  # the file or the part checked
    detail: str  # what was found

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.what}: {self.detail}"


def _model_checks(model_dir: Path) -> tuple[list[Check], dict | None]:
    """The manifest's seal and values, then every file it lists; the manifest when it is usable."""
    try:
        raw = manifest_io.load_manifest_json(model_dir)
        manifest = checkpoint.read_manifest(model_dir)
    except CheckpointError as exc:
        return [Check(False, str(model_dir / checkpoint.MANIFEST), str(exc))], None
    sealed = seal_problem(raw) is None
    checks = [Check(True, str(model_dir / checkpoint.MANIFEST),
                    "sealed, values valid" if sealed else "values valid, but no digest (`--seal` adds one)")]
    for role, entry in [("shared flow", manifest["shared"]), *((f"task {t['index']} ({'+'.join(t['classes'])})", t)
                                                                 for t in manifest["tasks"])]:
        try:
            checkpoint.read_checked(model_dir, entry)
            checks.append(Check(True, str(model_dir / entry["file"]), f"{role}, sha256 matches"))
        except CheckpointError as exc:
            checks.append(Check(False, str(model_dir / entry["file"]), str(exc)))
    return checks, manifest


def verify(model_dir: Path, export_dir: Path | None = None, seal: bool = False) -> list[Check]:
    """Every check of the model (and the export), in order; `seal` seals an unsealed manifest that passed."""
    model_dir = Path(model_dir)
    checks, manifest = _model_checks(model_dir)
    if manifest is None or not all(c.ok for c in checks):
        return checks
    try:
        system = load_system(model_dir)
        checks.append(Check(True, str(model_dir), f"loads: {len(system.tasks)} task(s), backbone as trained"))
    except CheckpointError as exc:
        return [*checks, Check(False, str(model_dir), str(exc))]
    if export_dir is not None:
        for runtime in ("onnx", "openvino"):  # the ONNX files, then the OpenVINO IR when it was exported
            if runtime == "openvino" and not (checks[-1].ok and list(Path(export_dir).glob("*.xml"))):
                break
            try:
                backbone, tasks, _ = checked_export(Path(export_dir), system, runtime)
                names = ", ".join(p.name for p in [backbone, *tasks.values()])
                checks.append(Check(True, str(export_dir), f"this model's export; {runtime} files match: {names}"))
            except CheckpointError as exc:
                checks.append(Check(False, str(export_dir), str(exc)))
    if seal and all(c.ok for c in checks):
        raw = manifest_io.load_manifest_json(model_dir)
        if seal_problem(raw) is not None:
            with manifest_io.writer_lock(model_dir):
                manifest_io.write_sealed(model_dir, raw)
            checks.append(Check(True, str(model_dir / checkpoint.MANIFEST), "sealed now"))
    return checks
