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

import hashlib
import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moleflow.atomic import atomic_write_bytes, atomic_write_text
from moleflow.config import ConfigError, ScoringConfig
from moleflow.continual.system import System
from moleflow.model.mole_flow import MoLEFlow
from moleflow.router import UNKNOWN, TaskRouter
from moleflow.scoring import Scores, anomaly_map, image_score, require_finite, task_patch_scores

MANIFEST = "export.json"
FORMAT = "moleflow-onnx"
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


def _write_ir(out: Path, onnx_name: str) -> dict:
    """The OpenVINO IR (.xml + .bin, f32) of an exported ONNX file beside it; its manifest entry."""
    import openvino as ov

    stem = onnx_name.removesuffix(".onnx")
    tmp = out / f".{stem}.tmp"
    tmp.mkdir(exist_ok=True)
    ov.save_model(ov.convert_model(str(out / onnx_name)), str(tmp / f"{stem}.xml"), compress_to_fp16=False)
    digest = hashlib.sha256()
    for ext in (".bin", ".xml"):  # the .xml last: a reader that finds it finds its weights
        data = (tmp / f"{stem}{ext}").read_bytes()
        digest.update(data)
        atomic_write_bytes(out / f"{stem}{ext}", data)
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    return {"file": f"{stem}.xml", "sha256": digest.hexdigest()}


def export_onnx(system: System, model_dir: Path, out: Path, fmt: str = "onnx") -> dict:
    """Write (or complete) the export of `system` in `out`: ONNX files, and with `fmt` "openvino" their
    OpenVINO IR too; returns the manifest."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if system.router.cfg.mode == "hybrid":
        raise ConfigError("router.mode hybrid needs the flow inside the router; export supports mahalanobis routing")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    old = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else None
    if old is not None and old.get("backbone_identity") != system.extractor.identity():
        raise ConfigError(f"{out} holds the export of another backbone; export into an empty folder")
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
            entry = {"index": rec.index, "file": name, "sha256": hashlib.sha256(data).hexdigest(), "model_sha256": rec.sha256}
        if fmt == "openvino" and "openvino" not in entry:
            entry = {**entry, "openvino": _write_ir(out, entry["file"])}
        tasks.append({**entry, "classes": list(rec.classes), "threshold": rec.threshold, "map_low": rec.map_low})
    backbone_ir = (old or {}).get("backbone_openvino")
    if fmt == "openvino" and backbone_ir is None:
        backbone_ir = _write_ir(out, "backbone.onnx")
    manifest = {"format": FORMAT, "opset": OPSET, "image_size": size, "model_dir": str(Path(model_dir).resolve()),
                "backbone_identity": system.extractor.identity(), "backbone": "backbone.onnx", "tasks": tasks,
                **({"backbone_openvino": backbone_ir} if backbone_ir else {})}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


RUNTIMES = ("onnx", "openvino")
Session = Callable[[dict[str, np.ndarray]], list[np.ndarray]]  # feeds -> outputs


def _session(path: Path, runtime: str) -> Session:
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


class OnnxScorer(ChainScorer):
    """`Scorer.score_images` on the exported files with ONNX Runtime or OpenVINO (routing by the PyTorch router)."""

    def __init__(self, export_dir: Path, router: TaskRouter, runtime: str = "onnx") -> None:
        if runtime not in RUNTIMES:
            raise ConfigError(f"export runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
        export_dir = Path(export_dir)
        manifest = json.loads((export_dir / MANIFEST).read_text())
        if manifest.get("format") != FORMAT:
            raise ConfigError(f"{export_dir / MANIFEST} is not a moleflow ONNX export")
        def file(entry: dict | None, onnx_name: str) -> Path:  # OpenVINO reads its IR where exported, else the ONNX
            return export_dir / (entry["file"] if runtime == "openvino" and entry else onnx_name)

        tasks = {e["index"]: _session(file(e.get("openvino"), e["file"]), runtime) for e in manifest["tasks"]}
        missing = sorted(set(router.prototypes) - set(tasks))
        if missing:
            raise ConfigError(f"{export_dir} lacks the tasks {missing} of the model; export it again (moleflow export)")
        backbone = _session(file(manifest.get("backbone_openvino"), manifest["backbone"]), runtime)
        super().__init__(backbone, tasks, router, manifest["image_size"])
