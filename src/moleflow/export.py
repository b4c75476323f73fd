"""`moleflow export`: a trained model as ONNX files (and OpenVINO IR) that score exactly as PyTorch does.

    DIR/
      export.json      format, image size, the model directory, per task: classes, threshold, map range, file, sha256
      backbone.onnx    images (B, 3, S, S) in [0, 1] -> patches (B, H, W, C), descriptors (B, 2C)
      task_000.onnx    patches (B, H, W, C) -> image score (B,), anomaly map (B, S, S), patch scores (B, H, W):
      task_001.onnx    positional encoding, whitening, mixer, flow with the task's LoRA merged, DIA, score, map
      *.xml, *.bin     with --format openvino: each file above converted to OpenVINO IR (f32 weights)

Routing stays the PyTorch router of the model directory (a few matrix products on the descriptors), so
an exported model routes exactly as the original. Exporting again after `add-task` writes only the new
task's file; the others stay byte-identical. `OnnxScorer` runs the files with ONNX Runtime or OpenVINO
(which reads ONNX; compiled for f32) behind the same interface as `Scorer.score_images` (`ChainScorer`,
which benchmarks/speed.py also feeds with torch.compile'd, bf16 and int8 versions of the same functions).
"""
from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moleflow.atomic import atomic_write_bytes, atomic_write_text
from moleflow.integrity import file_digest_problem, plain_name, read_document, seal_problem, sealed_json, sha256_bytes
from moleflow.config import ConfigError, ScoringConfig
from moleflow.continual.system import System
from moleflow.model.manifest import CheckpointError
from moleflow.model.mole_flow import MoLEFlow
from moleflow.router import UNKNOWN, TaskRouter
from moleflow.scoring import Scores, anomaly_map, image_score, require_finite, task_patch_scores

MANIFEST = "export.json"
FORMAT = "moleflow-onnx"
VERSION = 2  # 2: sealed by a digest, every file's sha256 checked at load, the model it came from named
OPSET = 17


class TaskChain(nn.Module):
    """One task's scoring chain as a plain module: patches -> (image score, map, patch scores)."""

    def __init__(self, model: MoLEFlow, task: int, cfg: ScoringConfig, image_size: int) -> None:
        super().__init__()
        self.model, self.task, self.cfg, self.image_size = model, task, cfg, image_size

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with self.model.use_task(self.task):
            s = task_patch_scores(self.model, patches, self.cfg)  # (B, H, W)
        return image_score(s, self.cfg.aggregation, self.cfg.top_k), anomaly_map(s, self.image_size, self.cfg.blur_sigma), s


def _onnx_bytes(module: nn.Module, example: torch.Tensor, inputs: list[str], outputs: list[str]) -> bytes:
    buf = io.BytesIO()
    axes = {name: {0: "batch"} for name in inputs + outputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module.eval(), (example,), buf, dynamo=False, input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET)
    return buf.getvalue()


FORMATS = ("onnx", "openvino")


def _file_entry(out: Path, name: str) -> dict:
    return {"file": name, "sha256": sha256_bytes((out / name).read_bytes())}


def _write_ir(out: Path, onnx_name: str) -> dict:
    """The OpenVINO IR (.xml + .bin, f32) of an exported ONNX file beside it; its manifest entry."""
    import openvino as ov

    stem = onnx_name.removesuffix(".onnx")
    tmp = out / f".{stem}.tmp"
    tmp.mkdir(exist_ok=True)
    ov.save_model(ov.convert_model(str(out / onnx_name)), str(tmp / f"{stem}.xml"), compress_to_fp16=False)
    for ext in (".bin", ".xml"):  # the .xml last: a reader that finds it finds its weights
        atomic_write_bytes(out / f"{stem}{ext}", (tmp / f"{stem}{ext}").read_bytes())
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    weights = _file_entry(out, f"{stem}.bin")
    return {**_file_entry(out, f"{stem}.xml"), "weights": weights["file"], "weights_sha256": weights["sha256"]}


def _previous(out: Path, system: System) -> dict | None:
    """The export already in `out` when it is one of this model's (to complete), else None or an error."""
    if not (out / MANIFEST).is_file():
        return None
    try:
        old = _read_sealed(out)
    except CheckpointError as exc:  # a damaged or older export.json: completing it would keep files never checked
        raise ConfigError(f"{out} holds an export that cannot be completed ({exc}); export into an empty folder") from None
    if old["model"]["backbone_identity"] != system.extractor.identity():
        raise ConfigError(f"{out} holds the export of another backbone; export into an empty folder")
    return old if old["model"]["shared_sha256"] == system.shared_sha256 else {**old, "tasks": []}  # shared flow changed


def export_onnx(system: System, model_dir: Path, out: Path, fmt: str = "onnx") -> dict:
    """Write (or complete) the export of `system` (loaded from `model_dir`) in `out`: ONNX files, and with
    `fmt` "openvino" their OpenVINO IR too; returns the manifest."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if system.router.cfg.mode == "hybrid":
        raise ConfigError("router.mode hybrid needs the flow inside the router; export supports mahalanobis routing")
    if not system.shared_sha256:
        raise ConfigError("export needs a saved model (Detector.load or load_system of a model folder)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    old = _previous(out, system)
    size = system.cfg.data.image_size
    example = torch.rand(2, 3, size, size, device=system.device)
    entries = {e["index"]: e for e in (old or {}).get("tasks", [])}
    if old is None:
        atomic_write_bytes(out / "backbone.onnx", _onnx_bytes(system.extractor, example, ["images"], ["patches", "descriptors"]))
    with torch.no_grad():
        patches = system.extractor(example)[0]
    tasks = []
    for rec in system.tasks:
        entry = entries.get(rec.index)
        if entry is None or entry.get("model_sha256") != rec.sha256:  # new, or retrained (finetune)
            data = _onnx_bytes(TaskChain(system.model, rec.index, system.cfg.scoring, size), patches,
                               ["patches"], ["image_score", "map", "patch_scores"])
            name = f"task_{rec.index:03d}.onnx"
            atomic_write_bytes(out / name, data)
            entry = {"index": rec.index, "file": name, "sha256": sha256_bytes(data), "model_sha256": rec.sha256}
        if fmt == "openvino" and "openvino" not in entry:
            entry = {**entry, "openvino": _write_ir(out, entry["file"])}
        tasks.append({**entry, "classes": list(rec.classes)})
    backbone_ir = (old or {}).get("backbone_openvino")
    if fmt == "openvino" and backbone_ir is None:
        backbone_ir = _write_ir(out, "backbone.onnx")
    manifest = {"format": FORMAT, "version": VERSION, "opset": OPSET, "image_size": size,
                "model_dir": str(Path(model_dir).resolve()),
                "model": {"shared_sha256": system.shared_sha256, "backbone_identity": system.extractor.identity()},
                "backbone": (old or {}).get("backbone") or _file_entry(out, "backbone.onnx"), "tasks": tasks,
                **({"backbone_openvino": backbone_ir} if backbone_ir else {})}
    atomic_write_text(out / MANIFEST, sealed_json(manifest))
    return manifest


RUNTIMES = ("onnx", "openvino")
Session = Callable[[dict[str, np.ndarray]], list[np.ndarray]]  # feeds -> outputs


def runtime_session(path: Path, runtime: str) -> Session:
    """One exported file as a function feeds -> outputs, on ONNX Runtime or OpenVINO (which reads ONNX)."""
    if runtime == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), ort.SessionOptions(), providers=["CPUExecutionProvider"])
        return lambda feeds: sess.run(None, feeds)
    import openvino as ov

    # f32 inference: the CPU plugin otherwise picks bf16/f16 where the processor has it (scores off by 10 %)
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda feeds: [np.asarray(v) for v in compiled(feeds).values()]


class ChainScorer:
    """`Scorer.score_images` over a backbone function (feeds {"images"} -> [patches, descriptors]) and one
    scoring-chain function per task (feeds {"patches"} -> [image score, map, patch scores]), NumPy in and
    out, routing by the PyTorch router. OnnxScorer's functions are the exported files on a runtime;
    benchmarks/speed.py gives it other versions of the same functions (torch.compile, bf16, int8)."""

    def __init__(self, backbone: Session, tasks: dict[int, Session], router: TaskRouter, image_size: int) -> None:
        missing = sorted(set(router.prototypes) - set(tasks))
        if missing:
            raise ConfigError(f"no scoring chain for the tasks {missing} of the router")
        self.backbone, self.tasks, self.router, self.image_size = backbone, tasks, router, image_size

    def score_images(self, images: torch.Tensor, names: list[str] | None = None) -> Scores:
        names = names or [f"image {i} of the batch" for i in range(len(images))]
        patches, desc = self.backbone({"images": images.detach().cpu().numpy().astype(np.float32)})
        require_finite(torch.from_numpy(patches), names, "backbone features")  # as Scorer.score_images
        routed = self.router.route(torch.from_numpy(desc))
        b, h, w, _ = patches.shape
        image = torch.full((b,), float("nan"))
        patch = torch.zeros(b, h, w)
        maps = torch.zeros(b, self.image_size, self.image_size)
        for t in sorted(set(routed.tolist()) - {UNKNOWN}):
            idx = (routed == t).nonzero().squeeze(1)
            s_img, s_map, s_patch = self.tasks[t]({"patches": patches[idx.numpy()]})
            require_finite(torch.from_numpy(s_patch), [names[i] for i in idx.tolist()], f"anomaly scores under task {t}")
            image[idx], maps[idx], patch[idx] = torch.from_numpy(s_img), torch.from_numpy(s_map), torch.from_numpy(s_patch)
        return Scores(routed, image, patch, maps)


def _read_sealed(export_dir: Path) -> dict:
    """export.json of `export_dir`, its format and digest checked (CheckpointError naming the problem)."""
    path = Path(export_dir) / MANIFEST
    again = f"export the model again: moleflow export MODEL --out {export_dir}"
    if not path.is_file():
        raise CheckpointError(f"{export_dir} is not a moleflow export ({MANIFEST} is missing); {again}")
    manifest, problem = read_document(path, FORMAT, VERSION, "moleflow ONNX export")
    if problem is not None:
        raise CheckpointError(f"{path} {problem} (written by another moleflow, or damaged); {again}")
    problem = seal_problem(manifest)
    if problem is not None:
        raise CheckpointError(f"{path} has {problem}: it was damaged or edited by hand; {again}")
    return manifest


def _check_file(export_dir: Path, name: object, sha256: object, role: str) -> Path:
    """The path of the export's file `name` for `role` after checking its digest."""
    again = f"export the model again (moleflow export MODEL --out {export_dir})"
    if not plain_name(name):
        raise CheckpointError(f"{export_dir / MANIFEST}: the {role} file {name!r} is not a plain name in the folder; {again}")
    path = Path(export_dir) / str(name)
    problem = file_digest_problem(path, str(sha256))
    if problem is not None:
        raise CheckpointError(f"{path} ({role}) {problem}; {again}")
    return path


def _runtime_file(export_dir: Path, entry: dict, runtime: str, role: str) -> Path:
    """The file of `entry` that `runtime` reads (OpenVINO: its IR where exported, else the ONNX), checked."""
    ir = entry.get("openvino") if runtime == "openvino" else None
    if ir is None:
        return _check_file(export_dir, entry.get("file"), entry.get("sha256"), role)
    _check_file(export_dir, ir.get("weights"), ir.get("weights_sha256"), f"{role} weights")
    return _check_file(export_dir, ir.get("file"), ir.get("sha256"), role)


def checked_export(export_dir: Path, system: System, runtime: str) -> tuple[Path, dict[int, Path], int]:
    """The files an export runs, each checked against its digest, and its image size; refused unless the
    export was made from this model (its shared flow, backbone, and every task's file)."""
    manifest = _read_sealed(export_dir)
    again = f"export this model again (moleflow export MODEL --out {export_dir})"
    made_from = manifest["model"]
    if made_from["shared_sha256"] != system.shared_sha256 or made_from["backbone_identity"] != system.extractor.identity():
        raise CheckpointError(f"{export_dir} is the export of another model (made from {manifest['model_dir']}); {again}")
    exported = {e["index"]: e for e in manifest["tasks"]}
    missing = sorted(r.index for r in system.tasks if r.index not in exported)
    if missing:
        raise CheckpointError(f"{export_dir} lacks the tasks {missing} of the model; {again}")
    stale = sorted(r.index for r in system.tasks if exported[r.index]["model_sha256"] != r.sha256)
    extra = sorted(set(exported) - {r.index for r in system.tasks})
    if stale or extra:
        raise CheckpointError(f"{export_dir} was made from another version of this model (tasks {stale or extra}); {again}")
    backbone = _runtime_file(export_dir, {**manifest["backbone"], "openvino": manifest.get("backbone_openvino")},
                             runtime, "backbone")
    tasks = {t: _runtime_file(export_dir, e, runtime, f"task {t}") for t, e in exported.items()}
    return backbone, tasks, manifest["image_size"]


class OnnxScorer(ChainScorer):
    """`Scorer.score_images` on the exported files with ONNX Runtime or OpenVINO (routing by the PyTorch
    router), after checking that the export is this model's and every file its own."""

    def __init__(self, export_dir: Path, system: System, runtime: str = "onnx") -> None:
        if runtime not in RUNTIMES:
            raise ConfigError(f"export runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
        backbone, tasks, size = checked_export(Path(export_dir), system, runtime)
        super().__init__(runtime_session(backbone, runtime), {t: runtime_session(p, runtime) for t, p in tasks.items()},
                         system.router, size)
