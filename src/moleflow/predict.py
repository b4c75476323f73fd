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


def readable_images(files: list[Path], image_size: int) -> tuple[list[Path], list[tuple[str, str]]]:
    """The files that decode as images, and (file, reason) for each that does not (`predict --skip-bad`)."""
    good, bad = [], []
    for f in files:
        try:
            load_image(f, image_size)
            good.append(f)
        except DatasetError as exc:
            bad.append((str(f), str(exc)))
    return good, bad


def predict_batch(detector: Detector, files: list[Path], start: int, out_dir: Path, shown: list[str] | None = None) -> list[str]:
    """The predictions.jsonl lines of images `files` (numbered from `start`), their PNGs written;
    `shown` are the paths as the user gave them (default: `files`)."""
    images = [load_image(f, detector.image_size) for f in files]  # (3, S, S) in [0, 1] each
    preds = detector.predict_tensors(torch.stack(images), [str(f) for f in files])
    shown = shown or [str(f) for f in files]
    return [json.dumps(_record(p, start + i, Path(shown[i]), out_dir, images[i])) for i, p in enumerate(preds)]


def run_predict(model_dir: Path, paths: list[Path], out_dir: Path, progress: bool = True, batch_size: int = 8,
                runtime: str = "torch", export_dir: Path | None = None, ray: str | None = None,
                skip_bad: bool = False) -> tuple[int, list[tuple[str, str]]]:
    """Score the images named or found in `paths`; write predictions.jsonl and the PNGs to `out_dir`.
    With `ray` (a cluster address) the batches are scored by Ray Data actors that load the model once.
    With `skip_bad`, files that do not decode are left out and listed in skipped.jsonl. Returns the
    number of predictions and the skipped (file, reason) pairs."""
    detector = Detector.load(model_dir, runtime, export_dir)
    if detector.system.router.cfg.mode == "oracle":
        raise ConfigError("this model routes with the oracle (router.mode: oracle), which needs each image's true task; "
                          "predict cannot know it: retrain with router.mode=mahalanobis")
    files, skipped = collect_images(paths), []
    if skip_bad:
        files, skipped = readable_images(files, detector.image_size)
        if not files:
            raise DatasetError(f"none of the {len(skipped)} files decodes as an image (first: {skipped[0][1]})")
    out_dir = Path(out_dir)
    (out_dir / "maps").mkdir(parents=True, exist_ok=True)
    if ray is not None:
        from moleflow.predict_ray import predict_on_ray

        lines = predict_on_ray(ray, model_dir, runtime, export_dir, files, out_dir, batch_size)
    else:
        lines = []
        for start in tqdm(range(0, len(files), batch_size), desc="predict", disable=not progress):
            try:
                lines += predict_batch(detector, files[start : start + batch_size], start, out_dir)
            except DatasetError as exc:
                raise DatasetError(f"{exc} (predict --skip-bad leaves unreadable files out)") from None
    atomic_write_text(out_dir / "predictions.jsonl", "\n".join(lines) + "\n")
    if skip_bad:
        atomic_write_text(out_dir / "skipped.jsonl", "".join(json.dumps({"path": f, "reason": r}) + "\n" for f, r in skipped))
    return len(lines), skipped
