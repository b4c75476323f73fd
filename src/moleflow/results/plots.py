"""PNG figures of a run, under `run_dir/plots/` (`write_run_plots`):

- `heatmap_image_auroc.png` (and `heatmap_pixel_ap.png` when the data has masks): R[step][task];
- `roc_all.png` and per task `roc_<t>_<name>.png`, `hist_<t>_<name>.png`, `panels_<t>_<name>.png`;
- `loss_curves.png` when the results hold training losses.

Figures are drawn with matplotlib's object-oriented `Figure` on the Agg canvas and written atomically;
the anomaly-map images (panels, colour maps, the PNGs of `moleflow predict`) live in `panels.py`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_auc_score, roc_curve

from moleflow.results.panels import draw_panels, save_figure
from moleflow.results.schema import RunResults, get_metric

GOOD_COLOR, DEFECT_COLOR = "tab:blue", "tab:red"


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
    score_label: str = "anomaly score"  # what the task's maps show (scoring.patch_score_label), for colour bars

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


# --------------------------------------------------------------------------- figures


def safe_name(name: str) -> str:
    """A task name usable in a file name ("bottle+cable" stays, "a/b c" -> "a_b_c")."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "task"


def _metric_grid(results: RunResults, key: str) -> tuple[np.ndarray, list[int]]:
    """(steps, tasks) array of metric `key` with NaN where a task was not (yet) evaluated; row -> after-task index."""
    steps = results.steps
    if not steps:  # only the summary: final.matrices (column = position in the row)
        rows = results.final.matrices.get(key, ()) if results.final is not None else ()
        grid = np.full((len(rows), max((len(r) for r in rows), default=0)), np.nan)
        for i, row in enumerate(rows):
            for j, v in enumerate(row):
                if v is not None:
                    grid[i, j] = v
        return grid, list(range(len(rows)))
    n_tasks = max(len(results.tasks), max((e.task + 1 for s in steps for e in s.per_task), default=0))
    grid = np.full((len(steps), n_tasks), np.nan)
    for i, step in enumerate(steps):
        for e in step.per_task:
            if e.value(key) is not None:
                grid[i, e.task] = e.value(key)
    return grid, [s.after_task for s in steps]


def _heatmap(results: RunResults, key: str, path: Path) -> Path:
    grid, after = _metric_grid(results, key)
    names = results.task_names
    n_rows, n_cols = grid.shape
    label = lambda t: f"{t}: {names[t]}" if t < len(names) else str(t)  # noqa: E731
    fig = Figure(figsize=(max(5.0, 0.75 * n_cols + 2.8), max(3.0, 0.45 * n_rows + 1.8)), layout="constrained")
    ax = fig.add_subplot()
    # AUROC below 0.5 is worse than chance, so its scale starts there; AP uses the full [0, 1].
    vmin = 0.5 if key.endswith("auroc") or key == "aupro" else 0.0
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
    title = get_metric(key).title
    ax.set_title(f"{title} per task after each step\n(routing on)")
    fig.colorbar(im, ax=ax, label=title, shrink=0.9)
    return save_figure(fig, path)


def _loss_curves(results: RunResults, path: Path) -> Path | None:
    names = results.task_names
    curves = [(s.after_task, s.train.epoch_loss) for s in results.steps if s.train is not None and s.train.epoch_loss]
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
    return save_figure(fig, path)


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
    return save_figure(fig, path)


def _roc_all(views: list[TaskView], path: Path) -> Path:
    fig = Figure(figsize=(6.0, 6.0), layout="constrained")
    ax = fig.add_subplot()
    for v in views:
        roc = _roc_points(v)
        if roc is not None:
            ax.plot(roc[0], roc[1], lw=1.5, label=f"{v.task}: {v.name} (AUROC {roc[2]:.4f})")
    _roc_axes(ax, "ROC of every task after the last step (routing on)")
    ax.legend(loc="lower right", fontsize=8 if len(views) <= 8 else 6)
    return save_figure(fig, path)


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
    return save_figure(fig, path)


# --------------------------------------------------------------------------- a run


def write_run_plots(run_dir: Path, results: RunResults, views: list[TaskView], image_size: int, panels_per_task: int = 3) -> list[Path]:
    """Every figure of a run into run_dir/plots/; returns the files written (see the module docstring)."""
    out = Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    files = [_heatmap(results, "image_auroc", out / "heatmap_image_auroc.png")]
    if results.has_values("pixel_ap"):
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
            files.append(draw_panels(v, image_size, panels_per_task, out / f"panels_{stem}.png", v.score_label))
    return files
