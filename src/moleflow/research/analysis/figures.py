"""The PNG figures of the analysis, one per measurement (where it applies), drawn from the measurements'
'_'-prefixed arrays on the Agg canvas and written atomically without a timestamp."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; figures are drawn on the Agg canvas

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy import stats

from moleflow.atomic import atomic_write_bytes
from moleflow.research.analysis.statistics import MAX_QQ_VALUES, border_distance, subsample_rows

DPI = 110
RUN_COLORS = ("tab:blue", "tab:orange")
RUN_STYLES = ("-", "--")  # the two runs often overlap: a dashed line over a solid one keeps both visible


def _save(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})  # layout is constrained: one draw, no tight-bbox pass
    atomic_write_bytes(path, buf.getvalue())
    return path


def _good_defect_panels(panels: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]], path: Path, label: str,
                        xlabel: str | None = None) -> Path:
    """One panel per run of (good sample, defect sample, bins, title): their overlaid densities; `label` has
    a {} for "good" / "defect"."""
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    for i, (good, defect, bins, title) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.hist(good, bins=bins, density=True, alpha=0.6, color="tab:blue", label=label.format("good"))
        ax.hist(defect, bins=bins, density=True, alpha=0.6, color="tab:red", label=label.format("defect"))
        ax.set_title(title, fontsize=9)
        if xlabel is not None:
            ax.set_xlabel(xlabel)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_spatial(res: list[dict], labels: list[str], path: Path) -> Path:
    fig = Figure(figsize=(13, 4), layout="constrained")
    vmax = max(float(r["_tail_freq"].max()) for r in res) or 1.0
    for i, (r, lab) in enumerate(zip(res, labels)):
        ax = fig.add_subplot(1, 3, i + 1)
        im = ax.imshow(r["_tail_freq"], cmap="magma", vmin=0, vmax=vmax)
        ax.set_title(f"{lab}: tail frequency per cell")
        fig.colorbar(im, ax=ax, fraction=0.046)
    ax = fig.add_subplot(1, 3, 3)
    h, w = res[0]["grid"]
    all_d = border_distance(h, w).reshape(-1)
    bins = np.arange(all_d.max() + 2) - 0.5
    ax.hist(all_d, bins=bins, density=True, histtype="step", color="k", label="all patches")
    for r, lab, c, ls in zip(res, labels, RUN_COLORS, RUN_STYLES):
        ax.hist(r["_tail_dist"], bins=bins, density=True, histtype="step", color=c, ls=ls, lw=1.5, label=f"tail, {lab}")
    ax.set_xlabel("distance to the border (patches)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_similarity(res: list[dict], labels: list[str], path: Path) -> Path:
    panels = [(r["_nearest_good"], r["_nearest_defect"],
               np.linspace(min(r["_nearest_good"].min(), r["_nearest_defect"].min()), 1.0, 50),
               f"{lab}: cosine to nearest train-tail patch (centred)") for r, lab in zip(res, labels)]
    return _good_defect_panels(panels, path, "test {} patches")


def plot_grad_norms(series: tuple[list[dict], list[dict]], labels: list[str], path: Path) -> Path:
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["viridis"]
    blocks = list(series[0][0])
    for j, k in enumerate(blocks):
        col = cmap(j / max(1, len(blocks) - 1))
        for ser, style, lab in zip(series, ("-", "--"), labels):
            ax.plot(np.arange(1, len(ser) + 1), [e[k] for e in ser], style, marker="o", ms=3, color=col,
                    label=f"{k} {lab}" if j in (0, len(blocks) - 1) else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean gradient norm (colour: block index)")
    ax.set_yscale("log")
    ax.set_title("coupling-block gradient norms (solid: " + labels[0] + ", dashed: " + labels[1] + ")", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_latent(zs: list[np.ndarray], labels: list[str], path: Path, rng: np.random.Generator) -> Path:
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    probs = np.linspace(0.0005, 0.9995, 400)
    theo = stats.norm.ppf(probs)
    for z, lab, c, m in zip(zs, labels, RUN_COLORS, ("o", "x")):
        ax.plot(theo, np.quantile(z.reshape(-1), probs), m, ms=3, mfc="none", color=c, label=lab)
    ax.plot(theo, theo, "k--", lw=1, label="N(0,1)")
    ax.set_xlabel("normal quantile")
    ax.set_ylabel("empirical quantile of z")
    ax.set_title("QQ plot of z components (test good patches)", fontsize=9)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    lo = min(np.quantile(z, 0.0005) for z in zs)
    hi = max(np.quantile(z, 0.9995) for z in zs)
    bins = np.linspace(min(lo, -4), max(hi, 4), 80)
    for z, lab, c, ls in zip(zs, labels, RUN_COLORS, RUN_STYLES):
        ax.hist(subsample_rows(z.reshape(-1), MAX_QQ_VALUES, rng), bins=bins, density=True, histtype="step", color=c, ls=ls,
                label=lab)
    ax.plot(bins, stats.norm.pdf(bins), "k--", lw=1, label="N(0,1)")
    ax.set_yscale("log")
    ax.set_title("density of z components (log scale)", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_separation(res: list[dict], labels: list[str], path: Path) -> Path:
    panels = [(r["_good"], r["_defect"],
               np.linspace(min(r["_good"].min(), r["_defect"].min()), max(r["_good"].max(), r["_defect"].max()), 80),
               f"{lab}: Fisher {r['fisher']:.3f}, overlap {r['overlap']:.3f}") for r, lab in zip(res, labels)]
    return _good_defect_panels(panels, path, "{} pixels", xlabel="pixel anomaly score")


def plot_logdets(res: list[dict], labels: list[str], path: Path) -> Path:
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    names = [r["part"] for r in res[0]["rows"] if r["part"] != "total"]
    x = np.arange(len(names))
    for i, (r, lab, c) in enumerate(zip(res, labels, RUN_COLORS)):
        rows = {row["part"]: row for row in r["rows"]}
        ax.bar(x + (i - 0.5) * 0.38, [rows[n]["mean"] for n in names], 0.38, yerr=[rows[n]["std"] for n in names],
               color=c, label=lab, capsize=2)
    ax.set_xticks(x, names)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("per-patch log|det J| (mean ± std)")
    ax.set_title("per-block log-det on test good patches", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_sweep(ax: Axes, sweep: list[dict]) -> None:
    """Image AUROC / pixel AP (left axis) and Gini (right axis) against the sweep's tail ratio."""
    rows = sorted(sweep, key=lambda r: r["tail_ratio"])
    ratios = [r["tail_ratio"] for r in rows]
    for key, lab, c in (("pixel_ap", "pixel AP", "tab:red"), ("image_auroc", "image AUROC", "tab:green")):
        ax.plot(ratios, [np.nan if r[key] is None else r[key] for r in rows], "o-", color=c, label=lab)
    ax.set_xscale("log")
    ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
    ax.minorticks_off()
    ax.set_xlabel("loss.tail_ratio ρ")
    ax.set_ylabel("metric")
    ax2 = ax.twinx()
    ax2.plot(ratios, [r["gini"] for r in rows], "s--", color="k", label="Gini")
    ax2.set_ylabel("Gini of loss weights")
    ax.legend(loc="center left", fontsize=8)
    ax2.legend(loc="center right", fontsize=8)
    ax.set_title("tail-ratio sweep", fontsize=9)


def plot_concentration(main: list[dict], labels: list[str], sweep: list[dict], path: Path) -> Path:
    fig = Figure(figsize=(11 if sweep else 5.5, 4), layout="constrained")
    ax = fig.add_subplot(1, 2 if sweep else 1, 1)
    for r, lab, c in zip(main, labels, RUN_COLORS):
        w = np.sort(r["_weights"])
        lorenz = np.r_[0, np.cumsum(w) / w.sum()]
        ax.plot(np.linspace(0, 1, len(lorenz)), lorenz, color=c, label=f"{lab} (Gini {r['gini']:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlabel("fraction of patches (sorted by loss weight)")
    ax.set_ylabel("fraction of the total loss weight")
    ax.set_title("Lorenz curve of per-patch loss weights ∂L/∂n", fontsize=9)
    ax.legend(fontsize=8)
    if sweep:
        _plot_sweep(fig.add_subplot(1, 2, 2), sweep)
    return _save(fig, path)


def draw_figures(per_run: list[dict[str, Any]], grads: dict[str, Any], sweep_rows: list[dict[str, Any]], labels: list[str],
                 out: Path, rng: np.random.Generator) -> dict[str, str]:
    """The figures that apply, into `out`: measurement number -> PNG file name."""
    def each(key: str) -> list[Any]:
        return [p[key] for p in per_run]

    pngs: dict[str, str] = {}
    pngs["1"] = plot_spatial(each("spatial"), labels, out / "tail_spatial.png").name
    if all(r.get("applicable") for r in each("similarity")):
        pngs["2"] = plot_similarity(each("similarity"), labels, out / "tail_feature_similarity.png").name
    if grads["recorded"]:
        pngs["3"] = plot_grad_norms(grads["_series"], labels, out / "grad_norms.png").name
    if all(len(z) for z in each("_z_good")):
        pngs["4"] = plot_latent(each("_z_good"), labels, out / "latent_calibration.png", rng).name
    if all(r.get("applicable") for r in each("separation")):
        pngs["5"] = plot_separation(each("separation"), labels, out / "score_separation.png").name
    if all(r.get("applicable") for r in each("logdet")):
        pngs["6"] = plot_logdets(each("logdet"), labels, out / "block_logdets.png").name
    pngs["7"] = plot_concentration(each("concentration"), labels, sweep_rows, out / "loss_concentration.png").name
    return pngs
