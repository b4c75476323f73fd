"""Tables of a run: the per-step table printed after `fit`, and `results.md`.

Tables follow the notes' `experiment-results.md`: per class, per step, final; metrics as fractions with
four decimals, `-` where a dataset cannot give a metric (pixel metrics without masks).
"""
from __future__ import annotations

METRIC_NAMES = {"image_auroc": "Img AUROC", "pixel_auroc": "Pix AUROC", "pixel_ap": "Pix AP", "aupro": "AUPRO@0.3"}


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _task_names(results: dict) -> list[str]:
    return ["+".join(t) for t in results["tasks"]]


def step_table(results: dict, metric: str = "image_auroc") -> str:
    """One row per step: the metric of every task seen so far (routing on), routing accuracy, forgetting."""
    from moleflow.results.summary import forgetting, metric_matrix

    names = _task_names(results)
    n = len(results["steps"])
    header = ["after task"] + names[: max((s["after_task"] for s in results["steps"]), default=0) + 1] + ["mean", "routing", "forgetting"]
    rows = []
    for i, step in enumerate(results["steps"]):
        vals = {e["task"]: e.get(metric) for e in step["per_task"]}
        row = [f"{step['after_task']} ({names[step['after_task']]})"]
        row += [fmt(vals.get(j)) if j in vals else "" for j in range(len(header) - 4)]
        present = [v for v in vals.values() if v is not None]
        row.append(fmt(sum(present) / len(present)) if present else "-")
        routing = [e["routing_accuracy"] for e in step["per_task"] if e.get("routing_accuracy") is not None]
        row.append(fmt(sum(routing) / len(routing)) if routing else "-")
        row.append(fmt(forgetting(metric_matrix(results["steps"][: i + 1], metric))))
        rows.append(row)
    title = f"{METRIC_NAMES.get(metric, metric)} per task after each step (routing on)"
    return f"{title}\n\n{_table(header, rows)}" if n else title


def final_table(results: dict) -> str:
    """Per class after the last step: the four metrics, with routing and with the oracle task."""
    last = results["steps"][-1]["per_task"]
    header = ["Task", "Class"] + list(METRIC_NAMES.values()) + ["Routing", "Oracle Img AUROC"]
    rows = []
    for e in last:
        if "per_class" not in e:
            rows.append([str(e["task"]), "+".join(e["classes"]), *["-"] * 4, "-", "-"])
            continue
        for cls, m in e["per_class"].items():
            rows.append([str(e["task"]), cls, *[fmt(m.get(k)) for k in METRIC_NAMES], fmt(e["routing_accuracy"]), fmt(e["oracle"]["image_auroc"])])
    f = results.get("final", {})
    rows.append(["**Mean**", "", *[f"**{fmt(f.get(k))}**" for k in METRIC_NAMES], f"**{fmt(f.get('routing_accuracy'))}**",
                 f"**{fmt(f.get('oracle', {}).get('image_auroc'))}**"])
    return _table(header, rows)


def results_markdown(results: dict) -> str:
    f = results.get("final", {})
    parts = ["# Results", "", "## Final (after the last task, routing on)", "", final_table(results), ""]
    forg = f.get("forgetting", {})
    parts += ["Forgetting (best earlier − final, mean over earlier tasks): "
              + ", ".join(f"{METRIC_NAMES[k]} {fmt(forg.get(k))}" for k in METRIC_NAMES), ""]
    for metric in METRIC_NAMES:
        if any(e.get(metric) is not None for s in results["steps"] for e in s["per_task"]):
            parts += [f"## {METRIC_NAMES[metric]} per step", "", step_table(results, metric).split("\n\n", 1)[1], ""]
    t = results.get("timings", {})
    if t:
        parts += ["## Timings", "", f"- features: {t.get('features_s', 0):.1f} s",
                  f"- training per task: {', '.join(f'{x:.1f}' for x in t.get('train_s_per_task', []))} s",
                  f"- evaluation: {t.get('eval_s', 0):.1f} s", ""]
    return "\n".join(parts)
