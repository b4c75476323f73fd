"""The suite behind `moleflow analyze tail`: open the two runs, measure, draw, write analysis.json and
analysis.md."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from moleflow.atomic import atomic_write_text
from moleflow.config import ConfigError
from moleflow.research.analysis.figures import draw_figures
from moleflow.research.analysis.loading import FeatureStore, config_diff, open_run
from moleflow.research.analysis.measurements import grad_norm_table, measure_run, sweep_concentration
from moleflow.research.analysis.report import Report, markdown


def _public(obj: Any) -> Any:
    """The JSON-able part of a result (keys starting with '_' hold arrays for the plots)."""
    if isinstance(obj, dict):
        return {k: _public(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_public(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def report_data(rep: Report) -> dict[str, Any]:
    """The content of analysis.json (before _public)."""
    return {
        "runs": [{"label": r.label, "path": str(r.path), "task": r.task, "classes": r.system.tasks[r.task].classes,
                  "tail_weight": r.loss.tail_weight, "tail_ratio": r.loss.tail_ratio, **r.metrics()} for r in rep.runs],
        "config_diff": rep.diff,
        "per_run": [{k: v for k, v in p.items() if not k.startswith("_")} for p in rep.per_run],
        "grad_norms": rep.grads, "sweep": rep.sweep_rows, "sweep_skipped": rep.sweep_skipped, "plots": rep.pngs,
        "max_images": rep.max_images,
    }


def analyze_tail(
    run_mean_only: Path,
    run_tail_aware: Path,
    out: Path,
    task: int = 0,
    sweep: list[Path] | tuple[Path, ...] = (),
    max_images: int = 64,
    progress: bool = True,
    seed: int = 0,
) -> Path:
    """The seven measurements of the tail-aware loss analysis; writes out/analysis.md (returned),
    out/analysis.json and PNG figures into `out`. `sweep`: run directories (or grid folders) that
    differ in loss.tail_ratio, for measurement 7."""
    if max_images < 2:
        raise ConfigError(f"max_images must be at least 2, got {max_images}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)  # drawn from in this order: the runs' measurements, then the figures
    runs = [open_run(run_mean_only, "mean-only", task), open_run(run_tail_aware, "tail-aware", task)]
    store = FeatureStore(max_images, progress)
    per_run = [measure_run(run, store.get(run, "train"), store.get(run, "test"), rng) for run in runs]
    grads = grad_norm_table(*runs)
    sweep_rows, sweep_skipped = sweep_concentration(sweep, runs, store, task)
    pngs = draw_figures(per_run, grads, sweep_rows, [r.label for r in runs], out, rng)
    rep = Report(runs, per_run, grads, sweep_rows, sweep_skipped, pngs, [list(d) for d in config_diff(*runs)], max_images)
    atomic_write_text(out / "analysis.json", json.dumps(_public(report_data(rep)), indent=2))
    atomic_write_text(out / "analysis.md", markdown(rep))
    return out / "analysis.md"
