"""PNG figures of a run and the anomaly-map PNGs of `moleflow predict`.

Figures are drawn with matplotlib's object-oriented `Figure` on the Agg canvas (no screen, no pyplot
global state, so nothing stays alive after a figure is saved) and written atomically. What a run gets,
under `run_dir/plots/`:

- `heatmap_image_auroc.png` (and `heatmap_pixel_ap.png` when the data has masks): R[step][task];
- `roc_all.png` and per task `roc_<t>_<name>.png`, `hist_<t>_<name>.png`, `panels_<t>_<name>.png`;
- `loss_curves.png` when the results hold training losses.
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display here; Figure() below draws on the Agg canvas anyway

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from moleflow.atomic import atomic_write_bytes

MAP_CMAP = "jet"  # the usual colour scale of anomaly maps in the AD literature: blue = normal, red = anomalous
DPI = 110
GOOD_COLOR, DEFECT_COLOR = "tab:blue", "tab:red"
METRIC_TITLES = {"image_auroc": "Image AUROC", "pixel_auroc": "Pixel AUROC", "pixel_ap": "Pixel AP", "aupro": "AUPRO@0.3"}


@dataclass
class TaskView:
    """One task's test set as scored after the last step (routing on)."""

    task: int
    name: str  # e.g. "bottle" or "bottle+cable"
    labels: np.ndarray  # (N,) 0 good / 1 defective
    scores: np.ndarray  # (N,) image scores
    threshold: float  # the task's decision threshold (calibrated on its training images)
    paths: list[str]  # image files, loaded with moleflow.data.load_image
    maps: np.ndarray  # (N, S, S) float32 anomaly maps
    masks: np.ndarray | None  # (N, S, S) bool ground truth; None when the dataset has no masks
    routed: np.ndarray  # (N,) the task each image was routed to

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels).astype(int).reshape(-1)
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        self.routed = np.asarray(self.routed).astype(int).reshape(-1)
        self.maps = np.asarray(self.maps, dtype=np.float32)
        self.threshold = math.nan if self.threshold is None else float(self.threshold)  # unknown -> no line drawn
        n = len(self.labels)
        sizes = {"scores": len(self.scores), "paths": len(self.paths), "maps": len(self.maps), "routed": len(self.routed)}
        if self.masks is not None:
            self.masks = np.asarray(self.masks).astype(bool)
            sizes["masks"] = len(self.masks)
        bad = {k: v for k, v in sizes.items() if v != n}
        if bad:
            raise ValueError(f"TaskView of task {self.task} ({self.name}): {n} labels but {bad}")
        if self.maps.ndim != 3 or (self.masks is not None and self.masks.shape != self.maps.shape):
            raise ValueError(f"TaskView of task {self.task} ({self.name}): maps must be (N, S, S) and masks the same shape; "
                             f"got maps {self.maps.shape}, masks {None if self.masks is None else self.masks.shape}")


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


def save_prediction_pngs(
    image: torch.Tensor | np.ndarray,
    amap: np.ndarray,
    vmin: float,
    vmax: float,
    map_path: Path,
    overlay_path: Path,
) -> None:
    """For `moleflow predict`: the anomaly map as a colour PNG and its overlay on the image, written atomically."""
    amap = np.asarray(amap)
    img = to_rgb_uint8(image)  # (S, S, 3)
    if img.shape[:2] != amap.shape:  # the map is at the model's input size; bring the image to it
        img = np.asarray(Image.fromarray(img).resize((amap.shape[1], amap.shape[0]), Image.Resampling.BILINEAR))
    rgb = colorize(amap, vmin, vmax)
    atomic_write_bytes(Path(map_path), _png_bytes(rgb))
    atomic_write_bytes(Path(overlay_path), _png_bytes(overlay(img, rgb)))


# --------------------------------------------------------------------------- figure helpers


def safe_name(name: str) -> str:
    """A task name usable in a file name ("bottle+cable" stays, "a/b c" -> "a_b_c")."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "task"


def _save(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    # No "Software" text chunk: the PNG stays lean and holds no URL (report.html is checked for none).
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())
    # Not registered with pyplot, the figure is freed with its last reference; no close() needed.
    return path


def _task_names(results: dict) -> list[str]:
    return ["+".join(t) for t in results.get("tasks", [])]


def _metric_grid(results: dict, metric: str) -> tuple[np.ndarray, list[int]]:
    """(steps, tasks) array of `metric` with NaN where a task was not (yet) evaluated; row -> after-task index."""
    steps = results.get("steps", [])
    n_tasks = max(len(results.get("tasks", [])), max((e["task"] + 1 for s in steps for e in s.get("per_task", [])), default=0))
    grid = np.full((len(steps), n_tasks), np.nan)
    for i, step in enumerate(steps):
        for e in step.get("per_task", []):
            if e.get(metric) is not None:
                grid[i, e["task"]] = e[metric]
    if not steps:  # only the summary is there: fall back to final.matrices (column = position in the row)
        rows = results.get("final", {}).get("matrices", {}).get(metric, [])
        grid = np.full((len(rows), max((len(r) for r in rows), default=0)), np.nan)
        for i, row in enumerate(rows):
            for j, v in enumerate(row):
                if v is not None:
                    grid[i, j] = v
        return grid, list(range(len(rows)))
    return grid, [s.get("after_task", i) for i, s in enumerate(steps)]


def _heatmap(results: dict, metric: str, path: Path) -> Path:
    grid, after = _metric_grid(results, metric)
    names = _task_names(results)
    n_rows, n_cols = grid.shape
    label = lambda t: f"{t}: {names[t]}" if t < len(names) else str(t)  # noqa: E731
    fig = Figure(figsize=(max(5.0, 0.75 * n_cols + 2.8), max(3.0, 0.45 * n_rows + 1.8)), layout="constrained")
    ax = fig.add_subplot()
    # AUROC below 0.5 is worse than chance, so its scale starts there; AP uses the full [0, 1].
    vmin = 0.5 if metric.endswith("auroc") or metric == "aupro" else 0.0
    cmap = colormaps["viridis"].with_extremes(bad="white")  # not evaluated -> blank cell
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=1.0, aspect="auto")
    fs = 9 if n_cols <= 6 else 7 if n_cols <= 12 else 6
    for i in range(n_rows):
        for j in range(n_cols):
            v = grid[i, j]
            if np.isfinite(v):
                # dark text on the bright (yellow) end of viridis, white text elsewhere
                color = "black" if (v - vmin) / (1.0 - vmin) > 0.6 else "white"
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=fs, color=color)
    ax.set_xticks(range(n_cols), [label(t) for t in range(n_cols)], rotation=45 if n_cols > 4 else 0,
                  ha="right" if n_cols > 4 else "center", fontsize=fs + 1)
    ax.set_yticks(range(n_rows), [f"after {label(t)}" for t in after], fontsize=fs + 1)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("training step")
    title = METRIC_TITLES.get(metric, metric)
    ax.set_title(f"{title} per task after each step\n(routing on)")
    fig.colorbar(im, ax=ax, label=title, shrink=0.9)
    return _save(fig, path)


def _loss_curves(results: dict, path: Path) -> Path | None:
    names = _task_names(results)
    curves = [(s.get("after_task", i), s["train"]["epoch_loss"]) for i, s in enumerate(results.get("steps", []))
              if s.get("train", {}).get("epoch_loss")]
    if not curves:
        return None
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for t, loss in curves:
        label = f"task {t}: {names[t]}" if t < len(names) else f"task {t}"
        ax.plot(range(1, len(loss) + 1), loss, marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean training loss")
    ax.set_title("Training loss per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncols=2 if len(curves) > 8 else 1)
    return _save(fig, path)


def _roc_points(view: TaskView) -> tuple[np.ndarray, np.ndarray, float] | None:
    """ROC curve and AUROC, or None when the test set holds only one class (ROC undefined)."""
    if len(np.unique(view.labels)) < 2:
        return None
    fpr, tpr, _ = roc_curve(view.labels, view.scores)
    return fpr, tpr, float(roc_auc_score(view.labels, view.scores))


def _roc_axes(ax, title: str) -> None:
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="chance")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false-positive rate (good images flagged)")
    ax.set_ylabel("true-positive rate (defects found)")
    ax.set_title(title)
    ax.grid(alpha=0.3)


def _roc_task(view: TaskView, path: Path) -> Path:
    fig = Figure(figsize=(5.0, 5.0), layout="constrained")
    ax = fig.add_subplot()
    roc = _roc_points(view)
    if roc is None:
        ax.text(0.5, 0.5, "ROC undefined:\nthe test set holds one class only", ha="center", va="center")
    else:
        fpr, tpr, auc = roc
        ax.plot(fpr, tpr, color="tab:purple", lw=2, label=f"AUROC {auc:.4f}")
        if math.isfinite(view.threshold):
            # the operating point of the calibrated threshold ("anomalous" means score > threshold)
            pred = view.scores > view.threshold
            good, bad = view.labels == 0, view.labels == 1
            ax.plot(pred[good].mean(), pred[bad].mean(), "ko", label=f"threshold {view.threshold:.4g}")
    n_bad = int(view.labels.sum())
    _roc_axes(ax, f"Task {view.task} ({view.name}): ROC\n{len(view.labels) - n_bad} good, {n_bad} defective")
    ax.legend(loc="lower right", fontsize=9)
    return _save(fig, path)


def _roc_all(views: list[TaskView], path: Path) -> Path:
    fig = Figure(figsize=(6.0, 6.0), layout="constrained")
    ax = fig.add_subplot()
    for v in views:
        roc = _roc_points(v)
        if roc is not None:
            ax.plot(roc[0], roc[1], lw=1.5, label=f"{v.task}: {v.name} (AUROC {roc[2]:.4f})")
    _roc_axes(ax, "ROC of every task after the last step (routing on)")
    ax.legend(loc="lower right", fontsize=8 if len(views) <= 8 else 6)
    return _save(fig, path)


def _histogram(view: TaskView, path: Path) -> Path:
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    values = view.scores[np.isfinite(view.scores)]
    if math.isfinite(view.threshold):
        values = np.append(values, view.threshold)  # keep the threshold inside the plotted range
    bins = np.histogram_bin_edges(values, bins=int(np.clip(len(view.scores) // 4, 10, 40))) if len(values) else 10
    for lab, name, color in ((0, "good", GOOD_COLOR), (1, "defective", DEFECT_COLOR)):
        s = view.scores[view.labels == lab]
        if len(s):
            ax.hist(s, bins=bins, color=color, alpha=0.55, edgecolor=color, label=f"{name} (n={len(s)})")
    if math.isfinite(view.threshold):
        ax.axvline(view.threshold, color="black", ls="--", lw=1.5, label=f"threshold {view.threshold:.4g}")
    ax.set_xlabel("image score (higher = more anomalous)")
    ax.set_ylabel("number of test images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Task {view.task} ({view.name}): image scores, good vs defective")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


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


def _panels(view: TaskView, image_size: int, k: int, path: Path) -> Path:
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
        subs[n].colorbar(mappable, cax=cax, orientation="horizontal", label="anomaly score (patch NLL)")
    else:
        subs[0].text(0.5, 0.5, "no test images", ha="center", va="center")
    return _save(fig, path)


# --------------------------------------------------------------------------- a run


def write_run_plots(run_dir: Path, results: dict, views: list[TaskView], image_size: int, panels_per_task: int = 3) -> list[Path]:
    """Every figure of a run into run_dir/plots/; returns the files written (see the module docstring)."""
    out = Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    files = [_heatmap(results, "image_auroc", out / "heatmap_image_auroc.png")]
    if any(e.get("pixel_ap") is not None for s in results.get("steps", []) for e in s.get("per_task", [])):
        files.append(_heatmap(results, "pixel_ap", out / "heatmap_pixel_ap.png"))
    loss = _loss_curves(results, out / "loss_curves.png")
    if loss is not None:
        files.append(loss)
    if views:
        files.append(_roc_all(views, out / "roc_all.png"))
    for v in views:
        stem = f"{v.task}_{safe_name(v.name)}"
        files.append(_roc_task(v, out / f"roc_{stem}.png"))
        files.append(_histogram(v, out / f"hist_{stem}.png"))
        if panels_per_task > 0:
            files.append(_panels(v, image_size, panels_per_task, out / f"panels_{stem}.png"))
    return files
