"""`moleflow predict`: score new images with a saved model, without being told their product type.

For every image: one JSON line (path, routed task, image score, threshold, anomalous) in
`predictions.jsonl`, and the anomaly map as a colour PNG plus an overlay on the image under `maps/`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moleflow.atomic import atomic_write_text
from moleflow.config import ConfigError
from moleflow.data import DatasetError, load_image
from moleflow.continual.system import System, load_system
from moleflow.router import UNKNOWN

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def collect_images(paths: list[Path]) -> list[Path]:
    """Image files named directly, or found (sorted, recursively) in the folders named."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise DatasetError(f"{p} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DatasetError(f"{p} does not exist")
    return files


def predict_batch(system: System, images: torch.Tensor, names: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """images (B, 3, S, S) in [0, 1] -> routed task (B,), image score (B,) (NaN where unknown),
    anomaly map (B, S, S): the system's scorer, without a task id. `names` (the files, for error
    messages) default to the images' places in the batch."""
    sc = system.scorer.score_images(images, names)
    return sc.tasks, sc.image, sc.maps


@torch.no_grad()
def run_predict(model_dir: Path, paths: list[Path], out_dir: Path, progress: bool = True, batch_size: int = 8) -> int:
    system = load_system(model_dir)
    from moleflow.results.panels import save_prediction_pngs

    size = system.cfg.data.image_size
    if system.router.cfg.mode == "oracle":
        raise ConfigError("this model routes with the oracle (router.mode: oracle), which needs each image's true task; "
                          "predict cannot know it: retrain with router.mode=mahalanobis")
    files = collect_images(paths)
    out_dir = Path(out_dir)
    (out_dir / "maps").mkdir(parents=True, exist_ok=True)
    lines = []
    for start in tqdm(range(0, len(files), batch_size), desc="predict", disable=not progress):
        batch = files[start : start + batch_size]
        images = torch.stack([load_image(f, size) for f in batch])  # (B, 3, S, S) in [0, 1]
        routed, scores, maps = predict_batch(system, images, [str(f) for f in batch])
        for i, f in enumerate(batch):
            t = int(routed[i])
            record = {"path": str(f), "task": t}
            if t == UNKNOWN:
                record.update({"classes": None, "image_score": None, "threshold": None, "anomalous": None,
                               "note": "no learned task matches this image (unknown product)"})
            else:
                rec = system.tasks[t]
                vmax = rec.threshold + 0.5 * max(rec.threshold - rec.map_low, 1e-6)
                stem = f"{start + i:05d}_{f.stem}"
                save_prediction_pngs(images[i], maps[i].numpy(), rec.map_low, vmax,
                                     out_dir / "maps" / f"{stem}_map.png", out_dir / "maps" / f"{stem}_overlay.png")
                record.update({"classes": rec.classes, "image_score": float(scores[i]), "threshold": rec.threshold,
                               "anomalous": bool(scores[i] > rec.threshold),
                               "map": f"maps/{stem}_map.png", "overlay": f"maps/{stem}_overlay.png"})
            lines.append(json.dumps(record))
    atomic_write_text(out_dir / "predictions.jsonl", "\n".join(lines) + "\n")
    return len(lines)
