"""Tables of a run: the per-step table printed after `fit`, `results.md`, and the tables of report.html.

A table is built once as data (`Table`) from the typed results, then rendered as Markdown here
(`markdown_table`) or as HTML by `html.py`. Tables follow the notes' `experiment-results.md`: per
class, per step, final; metrics as fractions with four decimals, `-` where a dataset cannot give a
metric (pixel metrics without masks). Metric headers come from the registry in `schema.py`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moleflow.results.schema import METRICS, ROUTING, Metrics, RunResults, Step, forgetting, get_metric, metric_matrix


@dataclass(frozen=True)
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    footer: Sequence[str] | None = None  # a summary row shown in bold (the mean)


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def markdown_table(table: Table) -> str:
    """A pipe table, every column centred; footer cells in **bold** (empty cells stay empty)."""
    lines = ["| " + " | ".join(table.header) + " |", "|" + "|".join(":---:" for _ in table.header) + "|"]
    rows = [*table.rows] + ([[f"**{c}**" if c else "" for c in table.footer]] if table.footer is not None else [])
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def step_title(key: str) -> str:
    return f"{get_metric(key).label} per task after each step (routing on)"


def metric_table(results: RunResults, key: str = "image_auroc") -> Table:
    """One row per step: metric `key` of every task seen so far (routing on), routing accuracy, forgetting."""
    names, steps = results.task_names, results.steps
    header = ["after task", *names[: max((s.after_task for s in steps), default=0) + 1], "mean", "routing", "forgetting"]
    rows = []
    for i, step in enumerate(steps):
        vals = {e.task: e.value(key) for e in step.per_task}
        present = [v for v in vals.values() if v is not None]
        routing = [e.routing_accuracy for e in step.per_task if e.routing_accuracy is not None]
        rows.append([
            f"{step.after_task} ({names[step.after_task]})",
            *[fmt(vals.get(j)) if j in vals else "" for j in range(len(header) - 4)],
            fmt(sum(present) / len(present)) if present else "-",
            fmt(sum(routing) / len(routing)) if routing else "-",
            fmt(forgetting(metric_matrix(steps[: i + 1], key))),
        ])
    return Table(header, rows)


def step_table(results: RunResults, key: str = "image_auroc") -> str:
    """The per-step table of metric `key` under its title, as printed after `fit`."""
    title = step_title(key)
    return f"{title}\n\n{markdown_table(metric_table(results, key))}" if results.steps else title


def final_table(results: RunResults) -> Table:
    """Per class after the last step: the metrics with routing, routing accuracy, and the oracle's image AUROC."""
    image = get_metric("image_auroc")
    header = ["Task", "Class", *[m.label for m in METRICS], ROUTING.label, f"Oracle {image.label}"]
    rows = []
    for e in results.steps[-1].per_task if results.steps else ():
        if not e.evaluated:
            rows.append([str(e.task), "+".join(e.classes), *["-"] * len(METRICS), "-", "-"])
            continue
        for cls, m in e.per_class.items():
            rows.append([str(e.task), cls, *[fmt(m.get(k.key)) for k in METRICS], fmt(e.routing_accuracy),
                         fmt(e.oracle.get(image.key))])
    f = results.final
    routed, oracle = (f.routed, f.oracle) if f is not None else (Metrics(), Metrics())
    footer = ["Mean", "", *[fmt(routed.get(m.key)) for m in METRICS], fmt(f.routing_accuracy if f is not None else None),
              fmt(oracle.get(image.key))]
    return Table(header, rows, footer)


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def decision_table(results: RunResults) -> Table | None:
    """Per task after the last step, the shipped verdict (score > threshold, routing on) on its test images:
    good ones called defective (false alarms) and defective ones called good (misses). None without rates."""
    last = [e for e in results.steps[-1].per_task if e.evaluated] if results.steps else []
    if not any(e.false_alarm_rate is not None or e.miss_rate is not None for e in last):
        return None
    rows = [[str(e.task), "+".join(e.classes), _rate(e.false_alarm_rate), _rate(e.miss_rate)] for e in last]
    return Table(["Task", "Classes", "False alarms (good called defective)", "Misses (defective called good)"], rows)


def forgetting_line(results: RunResults) -> str:
    forg = results.final.forgetting if results.final is not None else Metrics()
    return ("Forgetting (best earlier − final, mean over earlier tasks): "
            + ", ".join(f"{m.label} {fmt(forg.get(m.key))}" for m in METRICS))


def memory_weight_line(results: RunResults) -> str | None:
    """Each trained task's memory weight w in its map, (1 − w)·flow + w·memory, as chosen on synthetic defects
    of its own training images when it trained; None when no task chose one (a fixed weight, no blend)."""
    chosen = [(s.after_task, s.train.memory_weight) for s in results.steps
              if s.train is not None and s.train.memory_weight is not None]  # evaluate runs: no train log
    if not chosen:
        return None
    names = {t: "+".join(c) for t, c in enumerate(results.tasks)}
    return ("Memory weight w of each task's map, (1 − w)·flow + w·patch memory, chosen on synthetic defects of its "
            "training images: " + ", ".join(f"{names.get(t, t)} {w:g}" for t, w in chosen))


def results_markdown(results: RunResults) -> str:
    """results.md: the final table, forgetting, a per-step table per metric the data has, timings."""
    parts = ["# Results", "", "## Final (after the last task, routing on)", "", markdown_table(final_table(results)), ""]
    parts += [forgetting_line(results), ""]
    weights = memory_weight_line(results)
    if weights is not None:
        parts += [weights, ""]
    decisions = decision_table(results)
    if decisions is not None:
        parts += ["## Decisions at the shipped thresholds (routing on)", "", markdown_table(decisions), ""]
    for m in METRICS:
        if results.has_values(m.key):
            parts += [f"## {m.label} per step", "", markdown_table(metric_table(results, m.key)), ""]
    t = results.timings
    if t is not None:
        parts += ["## Timings", "", f"- features: {t.features_s:.1f} s",
                  f"- training per task: {', '.join(f'{x:.1f}' for x in t.train_s_per_task)} s",
                  f"- evaluation: {t.eval_s:.1f} s", ""]
    return "\n".join(parts)


def step_line(step: Step) -> str:
    """The progress line printed after each step: image AUROC per task and the mean routing accuracy."""
    parts = [f"{'+'.join(e.classes)}: {fmt(e.value('image_auroc'))}" for e in step.per_task]
    routing = [e.routing_accuracy for e in step.per_task if e.routing_accuracy is not None]
    return f"after task {step.after_task}: image AUROC " + ", ".join(parts) + (f" | routing {np.mean(routing):.3f}" if routing else "")
