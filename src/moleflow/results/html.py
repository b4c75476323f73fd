"""`report.html` of a run: one self-contained page that reads offline.

Tables are the `Table` values of `tables.py`, rendered here as HTML (the same data `results.md` shows as
Markdown); figures from `run_dir/plots/` are embedded as base64 data URIs; the style sheet is inline and
there is no script, so the file can be mailed or archived on its own.
"""
from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path

from moleflow.atomic import atomic_write_text
from moleflow.results.schema import METRICS, RunResults, get_metric
from moleflow.results.tables import Table, decision_table, final_table, forgetting_line, memory_weight_line, metric_table

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: center; }
th { background: #eee; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .9em; color: #444; margin-top: .3em; }
pre { background: #f5f5f5; padding: .8em; overflow-x: auto; font-size: .85em; }
.note { color: #666; font-size: .9em; }
"""


def _row(tag: str, cells: Sequence[str], bold: bool = False) -> str:
    def inner(c: str) -> str:
        return f"<strong>{html.escape(c)}</strong>" if bold and c else html.escape(c)

    return "<tr>" + "".join(f"<{tag}>{inner(c)}</{tag}>" for c in cells) + "</tr>"


def html_table(table: Table) -> str:
    """<table> with a header row; the footer row (the mean) in bold."""
    rows = [_row("th", table.header), *[_row("td", r) for r in table.rows]]
    if table.footer is not None:
        rows.append(_row("td", table.footer, bold=True))
    return "\n".join(["<table>", *rows, "</table>"])


# Plots in reading order: (file-name pattern, sort group, caption template).
_PLOT_KINDS: list[tuple[re.Pattern, int, str]] = [
    (re.compile(r"^heatmap_image_auroc$"), 0, f"{get_metric('image_auroc').title} of every task (columns) after each "
                                              "training step (rows), routing on. Blank cells: task not learned yet (or not evaluated)."),
    (re.compile(r"^heatmap_pixel_ap$"), 1, f"{get_metric('pixel_ap').title} of every task (columns) after each training "
                                           "step (rows), routing on."),
    (re.compile(r"^heatmap_(.+)$"), 2, "{0} per task after each step."),
    (re.compile(r"^loss_curves$"), 3, "Training loss per epoch of each task."),
    (re.compile(r"^roc_all$"), 4, "ROC curves of every task's test images after the last step (routing on)."),
    (re.compile(r"^roc_(\d+)_(.+)$"), 10, "Task {0} ({1}): ROC curve of the image scores after the last step; "
                                           "the dot is the operating point of the calibrated threshold."),
    (re.compile(r"^hist_(\d+)_(.+)$"), 11, "Task {0} ({1}): image scores of good and defective test images; "
                                            "dashed line: the decision threshold calibrated on training images."),
    (re.compile(r"^panels_(\d+)_(.+)$"), 12, "Task {0} ({1}): the most and least anomalous test images — image, "
                                              "anomaly map (one colour scale per task), overlay and, when the data has "
                                              "masks, the ground truth."),
]


def _plot_order(path: Path) -> tuple[int, int, int, str]:
    """(task or -1, section, kind, name): run-level figures first, then each task's figures together."""
    for pattern, group, _ in _PLOT_KINDS:
        m = pattern.match(path.stem)
        if m:
            task = int(m.group(1)) if group >= 10 else -1
            return (0 if task < 0 else 1, task, group, path.name)
    return (2, 0, 0, path.name)


def _caption(path: Path) -> str:
    for pattern, _, template in _PLOT_KINDS:
        m = pattern.match(path.stem)
        if m:
            return template.format(*m.groups())
    return path.stem.replace("_", " ")


def _figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    cap = html.escape(_caption(path))
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'
            f"<figcaption><code>{html.escape(path.name)}</code> — {cap}</figcaption></figure>")


def _timings(results: RunResults) -> list[str]:
    t = results.timings
    if t is None:
        return []
    items = [f"feature extraction: {t.features_s:.1f} s"]
    if t.train_s_per_task:
        per_task = t.train_s_per_task
        items.append(f"training per task: {', '.join(f'{x:.1f}' for x in per_task)} s (total {sum(per_task):.1f} s)")
    items.append(f"evaluation: {t.eval_s:.1f} s")
    return items


def tasks_table(results: RunResults) -> Table:
    """Every task: its classes, test images and defects in the last step, and why it was skipped if it was."""
    last = results.steps[-1].per_task if results.steps else ()
    by_task = {e.task: e for e in last}
    rows = []
    for t, classes in enumerate(results.tasks):
        e = by_task.get(t)
        n_test = "-" if e is None or e.n_test is None else str(e.n_test)
        n_defective = "-" if e is None or e.n_defective is None else str(e.n_defective)
        rows.append([str(t), " + ".join(classes), n_test, n_defective, (e.skipped or "") if e is not None else ""])
    return Table(["Task", "Classes", "Test images", "Defective", "Note"], rows)


def _metric_sections(results: RunResults) -> list[str]:
    body = ["<h2>Final (after the last task, routing on)</h2>", html_table(final_table(results))]
    if results.final is not None:
        body.append(f"<p>{html.escape(forgetting_line(results))}</p>")
    weights = memory_weight_line(results)
    if weights is not None:
        body.append(f"<p>{html.escape(weights)}</p>")
    decisions = decision_table(results)
    if decisions is not None:
        body += ["<h2>Decisions at the shipped thresholds (routing on)</h2>", html_table(decisions),
                 "<p class=\"note\">Each task's threshold is a high quantile of the scores of training images, each "
                 "scored by a fold model that did not train on it: held-out shares (scoring.calibration_holdout), "
                 "one fold model each (scoring.calibration_folds); the shipped task trains on them all.</p>"]
    for m in METRICS:
        if results.has_values(m.key):
            body += [f"<h2>{html.escape(m.label)} per step</h2>", html_table(metric_table(results, m.key))]
    return body


def _figure_sections(run_dir: Path, results: RunResults) -> list[str]:
    plots = sorted((run_dir / "plots").glob("*.png"), key=_plot_order) if (run_dir / "plots").is_dir() else []
    if not plots:
        return []
    body = ["<h2>Figures</h2>"]
    section = None
    for p in plots:
        key = _plot_order(p)
        if key[0] == 1 and key[1] != section:  # a heading per task
            section = key[1]
            name = " + ".join(results.tasks[section]) if section < len(results.tasks) else ""
            body.append(f"<h3>Task {section}: {html.escape(name)}</h3>")
        body.append(_figure(p))
    return body


def write_report_html(run_dir: Path, results: RunResults) -> Path:
    """run_dir/report.html: tables, timings and every PNG under run_dir/plots, in one offline file."""
    run_dir = Path(run_dir)
    title = html.escape(run_dir.resolve().name)
    body: list[str] = [f"<h1>moleflow run: {title}</h1>", "<h2>Tasks</h2>", html_table(tasks_table(results))]
    if results.steps:
        body += _metric_sections(results)
    else:
        body.append('<p class="note">No evaluation step was recorded in results.json.</p>')
    timings = _timings(results)
    if timings:
        body += ["<h2>Timings</h2>", "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in timings) + "</ul>"]
    body += _figure_sections(run_dir, results)
    config = run_dir / "config.yaml"
    if config.is_file():
        body += ["<h2>Configuration</h2>", "<details><summary>config.yaml (resolved)</summary>",
                 f"<pre>{html.escape(config.read_text(errors='replace'))}</pre></details>"]
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>moleflow report: {title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
    path = run_dir / "report.html"
    atomic_write_text(path, page)
    return path
