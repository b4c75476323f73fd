"""The Python API: `Detector` loads (or trains) a model and scores images given as files, Pillow images,
NumPy arrays or tensors, without being told their product.

    >>> from moleflow import Detector
    >>> det = Detector.load("runs/demo/model")                      # doctest: +SKIP
    >>> p = det.predict("cell_0001.png")                            # doctest: +SKIP
    >>> p.classes, p.score, p.threshold, p.anomalous                # doctest: +SKIP
    (('mono',), 1.93, 2.41, False)
    >>> p.anomaly_map.shape                                         # doctest: +SKIP
    (256, 256)
    >>> det.add_task(["bottle"], dataset="mvtec", root="../shared/data/mvtec_ad")  # doctest: +SKIP

`predict` takes one image (a path, a PIL image, an (H, W, 3) uint8 or (H, W) array, a (3, S, S) tensor)
and returns one `Prediction`, or a list / a (B, 3, S, S) tensor batch and returns a list. Files and arrays
are decoded and resized exactly as the training images were.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from moleflow.config import Config, ConfigError, load_config
from moleflow.continual.jobs import run_add_task, run_fit
from moleflow.continual.system import System, load_system
from moleflow.data import image_from_pil, load_image
from moleflow.model.checkpoint import TaskRecord
from moleflow.results.schema import RunResults
from moleflow.router import UNKNOWN

ImageLike = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one image. `task` is None when the router found no learned product
    (`router.unknown`); then classes, score, threshold and verdict are None too."""

    source: str  # the file, or "image i" for in-memory images
    task: int | None
    classes: tuple[str, ...] | None
    score: float | None
    threshold: float | None
    anomalous: bool | None  # score > threshold
    anomaly_map: np.ndarray | None  # (S, S) float32, the input's size
    map_range: tuple[float, float] | None  # the task's colour scale of the map (low, high)

    @property
    def unknown(self) -> bool:
        return self.task is None

    def to_json(self) -> dict:
        """The fields a log line or a service response carries (the map as an array stays out)."""
        return {"source": self.source, "task": self.task, "classes": None if self.classes is None else list(self.classes),
                "score": self.score, "threshold": self.threshold, "anomalous": self.anomalous, "unknown": self.unknown}


def map_range(record: TaskRecord) -> tuple[float, float]:
    """A task's map colour scale: from its training patches' 1st percentile to half a span above its threshold."""
    return record.map_low, record.threshold + 0.5 * max(record.threshold - record.map_low, 1e-6)


class Detector:
    """A trained moleflow model: `predict` images, `add_task` products, inspect `tasks`."""

    def __init__(self, system: System, model_dir: Path | None = None, export_dir: Path | None = None,
                 runtime: str = "torch") -> None:
        self.system = system
        self.model_dir = model_dir
        self.runtime = runtime
        self._onnx = None
        if runtime != "torch":
            from moleflow.export import OnnxScorer

            self._onnx = OnnxScorer(Path(export_dir), system, runtime)

    @classmethod
    def load(cls, model_dir: str | Path, runtime: str = "torch", export_dir: str | Path | None = None) -> Detector:
        """The model saved in `model_dir` (written by `fit`, `add-task` or `Detector.fit`). `runtime="onnx"`
        or `"openvino"` scores with ONNX Runtime or OpenVINO on the files `moleflow export` wrote to
        `export_dir` (routing stays the model's own router)."""
        if runtime not in ("torch", "onnx", "openvino"):
            raise ConfigError(f"runtime must be torch, onnx or openvino, not {runtime!r}")
        if runtime != "torch" and export_dir is None:
            raise ConfigError(f"runtime {runtime} needs the export folder (moleflow export MODEL_DIR --out DIR)")
        return cls(load_system(Path(model_dir)), Path(model_dir), None if export_dir is None else Path(export_dir), runtime)

    @classmethod
    def fit(cls, config: str | Path | Config, out_dir: str | Path, overrides: Sequence[str] = (), progress: bool = False) -> Detector:
        """Train the config's scenario task by task into `out_dir` (as `moleflow fit`) and load the model."""
        cfg = config if isinstance(config, Config) else load_config(config, list(overrides))
        if not cfg.output.save_model:
            raise ConfigError("Detector.fit needs output.save_model: true (it loads the saved model)")
        run_fit(cfg, Path(out_dir), progress=progress, echo=lambda _line: None)
        return cls.load(Path(out_dir) / "model")

    def add_task(self, classes: Sequence[str], dataset: str, root: str | Path | None = None, progress: bool = False,
                 ray: str | None = None) -> RunResults:
        """Learn one more product from its own images only (as `moleflow add-task`); the saved model and
        this detector both include it afterwards. `ray` (local, auto or a cluster address) trains it on a
        Ray worker, as `add-task --ray`."""
        if self.model_dir is None:
            raise ConfigError("add_task needs a detector loaded from a model directory (Detector.load)")
        if self.runtime != "torch":
            raise ConfigError("add_task trains in PyTorch: load the detector with runtime='torch', then export again")
        specs = [c if ":" in c else f"{dataset}:{c}" for c in classes]
        roots = {dataset: str(root)} if root is not None else {}
        results = run_add_task(self.model_dir, [specs], roots, None, progress=progress, echo=lambda _line: None, ray=ray)
        self.system = load_system(self.model_dir)
        return results

    @property
    def tasks(self) -> list[TaskRecord]:
        return list(self.system.tasks)

    @property
    def image_size(self) -> int:
        return self.system.cfg.data.image_size

    def to_tensor(self, image: ImageLike, name: str = "image") -> torch.Tensor:
        """One image as the model's input (3, S, S) float in [0, 1]."""
        size = self.image_size
        if isinstance(image, (str, Path)):
            return load_image(image, size)
        if isinstance(image, Image.Image):
            return image_from_pil(image, size, name)
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
                raise ValueError(f"{name}: a NumPy image must be uint8 (H, W), (H, W, 3) or (H, W, 4), got {image.dtype} {image.shape}")
            if image.shape[0] == 0 or image.shape[1] == 0:
                raise ValueError(f"{name}: the NumPy image is empty ({image.shape[0]} x {image.shape[1]} pixels)")
            return image_from_pil(Image.fromarray(image), size, name)
        if isinstance(image, torch.Tensor):
            if tuple(image.shape) != (3, size, size) or not image.is_floating_point():
                raise ValueError(f"{name}: a tensor image must be float (3, {size}, {size}) in [0, 1], got {image.dtype} {tuple(image.shape)}")
            x = image.detach().float().cpu()
            if not bool(torch.isfinite(x).all()) or float(x.min()) < 0.0 or float(x.max()) > 1.0:
                raise ValueError(f"{name}: a tensor image must hold values in [0, 1] (divide uint8 pixels by 255); "
                                 f"got values from {float(x.min()):.4g} to {float(x.max()):.4g}")
            return x
        raise TypeError(f"{name}: cannot read an image from {type(image).__name__}; give a path, PIL image, NumPy array or tensor")

    def predict(self, images: ImageLike | Sequence[ImageLike], batch_size: int = 8) -> Prediction | list[Prediction]:
        """Score one image (→ Prediction) or several (a list, or a (B, 3, S, S) tensor → list of Predictions)."""
        single = not isinstance(images, (list, tuple)) and not (isinstance(images, torch.Tensor) and images.dim() == 4)
        items = [images] if single else list(images)
        sources = [str(x) if isinstance(x, (str, Path)) else f"image {i}" for i, x in enumerate(items)]
        out: list[Prediction] = []
        for s in range(0, len(items), batch_size):
            batch = torch.stack([self.to_tensor(x, n) for x, n in zip(items[s : s + batch_size], sources[s : s + batch_size])])
            out += self.predict_tensors(batch, sources[s : s + batch_size])
        return out[0] if single else out

    @torch.no_grad()
    def predict_tensors(self, images: torch.Tensor, sources: list[str]) -> list[Prediction]:
        """A batch (B, 3, S, S) in [0, 1] → one Prediction per image: route, flow, map, score, verdict."""
        sc = (self._onnx or self.system.scorer).score_images(images, sources)
        out = []
        for i, source in enumerate(sources):
            t = int(sc.tasks[i])
            if t == UNKNOWN:
                out.append(Prediction(source, None, None, None, None, None, None, None))
                continue
            rec = self.system.tasks[t]
            score = float(sc.image[i])
            out.append(Prediction(source, t, tuple(rec.classes), score, rec.threshold, bool(score > rec.threshold),
                                  sc.maps[i].numpy(), map_range(rec)))
        return out
