"""`moleflow predict`: score new images with a saved model, without being told their product type.

For every image: one JSON line (path, routed task, image score, threshold, anomalous) in
`predictions.jsonl`, and the anomaly map as a colour PNG plus an overlay on the image under `maps/`.
The scoring is `Detector`'s (api.py), the same as the Python API's and the service's.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moleflow.api import Detector, Prediction
from moleflow.atomic import atomic_write_text
from moleflow.config import ConfigError
from moleflow.data import IMAGE_EXTENSIONS, DatasetError, is_image_file, load_image
from moleflow.results.panels import save_prediction_pngs
from moleflow.router import UNKNOWN


def collect_images(paths: list[Path]) -> list[Path]:
    """Image files named directly, or found (sorted, recursively) in the folders named."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if is_image_file(f))
            if not found:
                raise DatasetError(f"{p} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DatasetError(f"{p} does not exist")
    return files


def _record(p: Prediction, index: int, path: Path, out_dir: Path, image) -> dict:
    """One line of predictions.jsonl (and the PNGs of a known product)."""
    if p.unknown:
        return {"path": str(path), "task": UNKNOWN, "classes": None, "image_score": None, "threshold": None, "anomalous": None,
                "note": "no learned task matches this image (unknown product)"}
    stem = f"{index:05d}_{path.stem}"
    save_prediction_pngs(image, p.anomaly_map, *p.map_range, out_dir / "maps" / f"{stem}_map.png", out_dir / "maps" / f"{stem}_overlay.png")
    return {"path": str(path), "task": p.task, "classes": list(p.classes), "image_score": p.score, "threshold": p.threshold,
            "anomalous": p.anomalous, "map": f"maps/{stem}_map.png", "overlay": f"maps/{stem}_overlay.png"}


def run_predict(model_dir: Path, paths: list[Path], out_dir: Path, progress: bool = True, batch_size: int = 8,
                runtime: str = "torch", export_dir: Path | None = None) -> int:
    detector = Detector.load(model_dir, runtime, export_dir)
    if detector.system.router.cfg.mode == "oracle":
        raise ConfigError("this model routes with the oracle (router.mode: oracle), which needs each image's true task; "
                          "predict cannot know it: retrain with router.mode=mahalanobis")
    files = collect_images(paths)
    out_dir = Path(out_dir)
    (out_dir / "maps").mkdir(parents=True, exist_ok=True)
    lines = []
    for start in tqdm(range(0, len(files), batch_size), desc="predict", disable=not progress):
        batch = files[start : start + batch_size]
        images = [load_image(f, detector.image_size) for f in batch]  # (3, S, S) in [0, 1] each
        preds = detector.predict_tensors(torch.stack(images), [str(f) for f in batch])
        lines += [json.dumps(_record(p, start + i, f, out_dir, images[i])) for i, (p, f) in enumerate(zip(preds, batch))]
    atomic_write_text(out_dir / "predictions.jsonl", "\n".join(lines) + "\n")
    return len(lines)
