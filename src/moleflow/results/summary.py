"""The `final` block of results.json: means of the last row, forgetting, routing accuracy, metric matrices R[t][j]."""
from __future__ import annotations

import numpy as np

METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")


def forgetting(matrix: list[list[float | None]]) -> float | None:
    """Mean over j < T of (best earlier R[.][j] − final R[T][j]); `matrix[t][j]` for j <= t."""
    if len(matrix) < 2:
        return 0.0 if matrix else None
    final = matrix[-1]
    drops = []
    for j in range(len(matrix) - 1):
        earlier = [matrix[t][j] for t in range(j, len(matrix) - 1) if matrix[t][j] is not None]
        if earlier and final[j] is not None:
            drops.append(max(earlier) - final[j])
    return float(np.mean(drops)) if drops else None


def metric_matrix(steps: list[dict], metric: str, oracle: bool = False) -> list[list[float | None]]:
    rows = []
    for step in steps:
        row = []
        for entry in step["per_task"]:
            src = entry.get("oracle", {}) if oracle else entry
            row.append(src.get(metric))
        rows.append(row)
    return rows


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def summarize(steps: list[dict]) -> dict:
    """The `final` block of results.json: mean of the last row, forgetting, routing accuracy."""
    last = [e for e in steps[-1]["per_task"] if "n_test" in e]  # tasks skipped for lack of test data drop out
    final = {m: _mean([e[m] for e in last]) for m in METRICS}
    routed = [e for e in last if e["routing_accuracy"] is not None]
    n = sum(e["n_test"] for e in routed)
    final["routing_accuracy"] = float(sum(e["routing_accuracy"] * e["n_test"] for e in routed) / n) if n else None
    final["oracle"] = {m: _mean([e["oracle"][m] for e in last]) for m in METRICS}
    final["forgetting"] = {m: forgetting(metric_matrix(steps, m)) for m in METRICS}
    final["matrices"] = {m: metric_matrix(steps, m) for m in METRICS}
    return final
