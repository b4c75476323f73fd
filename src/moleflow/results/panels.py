"""Anomaly-map images: colour maps and overlays, the per-task panel figures of a run, and the PNGs of
`moleflow predict` (`save_prediction_pngs`).

Figures are drawn with matplotlib's object-oriented `Figure` on the Agg canvas (no screen, no pyplot
global state, so nothing stays alive after a figure is saved) and written atomically (`save_figure`).
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # no display here; Figure() below draws on the Agg canvas anyway

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

from moleflow.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from moleflow.results.plots import TaskView

MAP_CMAP = "jet"  # the usual colour scale of anomaly maps in the AD literature: blue = normal, red = anomalous
DPI = 110


# --------------------------------------------------------------------------- image helpers


def colorize(amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """(S, S) anomaly map -> (S, S, 3) uint8 RGB through the map colour scale, clipped to [vmin, vmax]."""
    amap = np.asarray(amap, dtype=np.float64)
    if amap.ndim != 2:
        raise ValueError(f"colorize expects a (S, S) map, got shape {amap.shape}")
    span = vmax - vmin
    norm = (amap - vmin) / span if span > 0 else np.zeros_like(amap)  # a flat scale shows everything as "low"
    norm = np.nan_to_num(np.clip(norm, 0.0, 1.0), nan=0.0)
    return colormaps[MAP_CMAP](norm, bytes=True)[..., :3]  # (S, S, 4) RGBA uint8 -> RGB


def to_rgb_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """An image as (S, S, 3) uint8: accepts (3, S, S) or (S, S, 3), float in [0, 1] or uint8."""
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)  # (C, S, S) -> (S, S, C)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"expected an image of shape (3, S, S) or (S, S, 3), got {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return a


def overlay(image: np.ndarray, amap_rgb: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a coloured map over the image: (1 - alpha) * image + alpha * map, (S, S, 3) uint8."""
    img = to_rgb_uint8(image)
    if img.shape != amap_rgb.shape:
        raise ValueError(f"overlay: image {img.shape} and coloured map {amap_rgb.shape} differ in shape")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay: alpha must be in [0, 1], got {alpha}")
    out = (1.0 - alpha) * img.astype(np.float32) + alpha * amap_rgb.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def prediction_pngs(image: torch.Tensor | np.ndarray, amap: np.ndarray, vmin: float, vmax: float) -> tuple[bytes, bytes]:
    """The anomaly map as a colour PNG and its overlay on the image (PNG bytes), for predict and the service."""
    amap = np.asarray(amap)
    img = to_rgb_uint8(image)  # (S, S, 3)
    if img.shape[:2] != amap.shape:  # the map is at the model's input size; bring the image to it
        img = np.asarray(Image.fromarray(img).resize((amap.shape[1], amap.shape[0]), Image.Resampling.BILINEAR))
    rgb = colorize(amap, vmin, vmax)
    return _png_bytes(rgb), _png_bytes(overlay(img, rgb))


def save_prediction_pngs(image: torch.Tensor | np.ndarray, amap: np.ndarray, vmin: float, vmax: float,
                         map_path: Path, overlay_path: Path) -> None:
    """For `moleflow predict`: `prediction_pngs`, written atomically."""
    map_png, overlay_png = prediction_pngs(image, amap, vmin, vmax)
    atomic_write_bytes(Path(map_path), map_png)
    atomic_write_bytes(Path(overlay_path), overlay_png)


def save_figure(fig: Figure, path: Path) -> Path:
    """The figure as a PNG at `path`, written atomically; returns `path`."""
    buf = io.BytesIO()
    # No "Software" text chunk: the PNG stays lean and holds no URL (report.html is checked for none).
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())
    # Not registered with pyplot, the figure is freed with its last reference; no close() needed.
    return path


# --------------------------------------------------------------------------- panels


def panel_columns(has_masks: bool) -> list[str]:
    """Column headings of a panel figure; the mask column exists only when the dataset has masks."""
    return ["image", "anomaly map", "overlay"] + (["ground truth"] if has_masks else [])


def map_scale(maps: np.ndarray) -> tuple[float, float]:
    """A common colour scale for one task's maps: the 1st and 99.5th percentiles (robust to outliers)."""
    flat = np.asarray(maps, dtype=np.float32).reshape(-1)
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return 0.0, 1.0
    if flat.size > 4_000_000:  # a strided sample gives the same percentiles to plotting precision, faster
        flat = flat[:: flat.size // 2_000_000]
    lo, hi = np.quantile(flat, [0.01, 0.995])
    return float(lo), float(hi if hi > lo else lo + 1e-6)


def panel_rows(scores: np.ndarray, k: int) -> list[tuple[str, int]]:
    """(row heading, image index): the k most anomalous images (highest first), then the k least anomalous
    (lowest first); with fewer than 2k images, none is shown twice."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    top = [int(i) for i in order[:k]]
    bottom = [int(i) for i in order[::-1][:k] if int(i) not in top]
    return [(f"most anomalous #{r + 1}", i) for r, i in enumerate(top)] + [(f"least anomalous #{r + 1}", i) for r, i in enumerate(bottom)]


def _load_rgb(path: str, size: int) -> np.ndarray | None:
    from moleflow.data import DatasetError, load_image

    try:
        return to_rgb_uint8(load_image(path, size))
    except (DatasetError, OSError):
        return None  # the image moved or broke since scoring; the panel says so instead of failing the run


def _short_path(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name  # MVTec names repeat per defect type


def draw_panels(view: TaskView, image_size: int, k: int, path: Path, score_label: str = "anomaly score") -> Path:
    """panels_<t>_<name>.png: the k most and k least anomalous test images of a task, a row each."""
    rows = panel_rows(view.scores, k)
    cols = panel_columns(view.masks is not None)
    vmin, vmax = map_scale(view.maps)
    size = view.maps.shape[-1]
    if size != image_size:
        raise ValueError(f"task {view.task} ({view.name}): maps are {size}x{size} but image_size is {image_size}")
    n = max(len(rows), 1)
    fig = Figure(figsize=(2.3 * len(cols) + 0.4, 2.55 * n + 1.3), layout="constrained")
    fig.suptitle(f"Task {view.task} ({view.name}): most and least anomalous test images\n"
                 f"map colour scale {vmin:.4g} … {vmax:.4g} (1st–99.5th percentile of this task's maps)", fontsize=11)
    subs = fig.subfigures(n + 1, 1, height_ratios=[1.0] * n + [0.3])
    mappable = None
    for r, (heading, i) in enumerate(rows):
        sf = subs[r]
        label = "defective" if view.labels[i] else "good"
        verdict = f" {'>' if view.scores[i] > view.threshold else '≤'} thr {view.threshold:.4g}" if math.isfinite(view.threshold) else ""
        route = f"routed to task {view.routed[i]}" + ("" if view.routed[i] == view.task else " (wrong)")
        sf.suptitle(f"{heading}: {_short_path(view.paths[i])} | {label} | score {view.scores[i]:.4g}{verdict} | {route}", fontsize=8.5)
        axes = sf.subplots(1, len(cols))
        rgb = _load_rgb(view.paths[i], size)
        amap_rgb = colorize(view.maps[i], vmin, vmax)
        if rgb is None:
            axes[0].text(0.5, 0.5, "image\nunavailable", ha="center", va="center", transform=axes[0].transAxes)
            axes[2].imshow(amap_rgb)
        else:
            axes[0].imshow(rgb)
            axes[2].imshow(overlay(rgb, amap_rgb))
        mappable = axes[1].imshow(view.maps[i], cmap=MAP_CMAP, vmin=vmin, vmax=vmax)
        if view.masks is not None:
            axes[3].imshow(view.masks[i], cmap="gray", vmin=0, vmax=1)
            if view.masks[i].any():  # the defect outline on the overlay, to judge the localisation
                axes[2].contour(view.masks[i], levels=[0.5], colors="white", linewidths=0.8)
        for ax, title in zip(axes, cols):
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    if mappable is not None:
        cax = subs[n].add_axes((0.15, 0.62, 0.7, 0.16))  # room below for the label
        subs[n].colorbar(mappable, cax=cax, orientation="horizontal", label=score_label)
    else:
        subs[0].text(0.5, 0.5, "no test images", ha="center", va="center")
    return save_figure(fig, path)
