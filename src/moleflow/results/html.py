"""`report.html` of a run: one self-contained page that reads offline.

Tables come from `moleflow.report` (markdown pipe tables, converted here), figures from `run_dir/plots/`
embedded as base64 data URIs; the style sheet is inline and there is no script, so the file can be
mailed or archived on its own.
"""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from moleflow.atomic import atomic_write_text
from moleflow.results.tables import METRIC_NAMES, final_table, fmt, step_table

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

_SEPARATOR = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _cell(text: str) -> str:
    return _BOLD.sub(r"<strong>\1</strong>", html.escape(text.strip()))


def _cells(line: str) -> list[str]:
    return line.strip().strip("|").split("|")


def markdown_tables_to_html(md: str) -> str:
    """Pipe tables become <table>s (first row = header, the ---- row dropped); other lines become paragraphs."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("|"):
            block = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                block.append(lines[i])
                i += 1
            has_header = len(block) > 1 and _SEPARATOR.match(block[1].strip()) is not None
            rows = [r for r in block if not _SEPARATOR.match(r.strip())]
            parts = ["<table>"]
            for k, row in enumerate(rows):
                tag = "th" if has_header and k == 0 else "td"
                parts.append("<tr>" + "".join(f"<{tag}>{_cell(c)}</{tag}>" for c in _cells(row)) + "</tr>")
            parts.append("</table>")
            out.append("\n".join(parts))
            continue
        if line.strip():
            out.append(f"<p>{_cell(line)}</p>")
        i += 1
    return "\n".join(out)


# Plots in reading order: (file-name pattern, sort group, caption template).
_PLOT_KINDS: list[tuple[re.Pattern, int, str]] = [
    (re.compile(r"^heatmap_image_auroc$"), 0, "Image AUROC of every task (columns) after each training step (rows), "
                                              "routing on. Blank cells: task not learned yet (or not evaluated)."),
    (re.compile(r"^heatmap_pixel_ap$"), 1, "Pixel AP of every task (columns) after each training step (rows), routing on."),
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


def _timings(results: dict) -> list[str]:
    t = results.get("timings") or {}
    items = []
    if "features_s" in t:
        items.append(f"feature extraction: {t['features_s']:.1f} s")
    per_task = t.get("train_s_per_task") or []
    if per_task:
        items.append(f"training per task: {', '.join(f'{x:.1f}' for x in per_task)} s (total {sum(per_task):.1f} s)")
    if "eval_s" in t:
        items.append(f"evaluation: {t['eval_s']:.1f} s")
    return items


def _tasks_section(results: dict) -> str:
    last = results["steps"][-1]["per_task"] if results.get("steps") else []
    by_task = {e["task"]: e for e in last}
    rows = ["<table><tr><th>Task</th><th>Classes</th><th>Test images</th><th>Defective</th><th>Note</th></tr>"]
    for t, classes in enumerate(results.get("tasks", [])):
        e = by_task.get(t, {})
        rows.append(f"<tr><td>{t}</td><td>{html.escape(' + '.join(classes))}</td><td>{e.get('n_test', '-')}</td>"
                    f"<td>{e.get('n_defective', '-')}</td><td>{html.escape(str(e.get('skipped', '')))}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def write_report_html(run_dir: Path, results: dict) -> Path:
    """run_dir/report.html: tables, timings and every PNG under run_dir/plots, in one offline file."""
    run_dir = Path(run_dir)
    body: list[str] = [f"<h1>moleflow run: {html.escape(run_dir.resolve().name)}</h1>"]
    steps = results.get("steps") or []
    body += ["<h2>Tasks</h2>", _tasks_section(results)]
    if steps:
        body += ["<h2>Final (after the last task, routing on)</h2>", markdown_tables_to_html(final_table(results))]
        forg = results.get("final", {}).get("forgetting", {})
        if forg:
            body.append("<p>Forgetting (best earlier − final, mean over earlier tasks): "
                        + ", ".join(f"{METRIC_NAMES[k]} {fmt(forg.get(k))}" for k in METRIC_NAMES) + "</p>")
        for metric, title in METRIC_NAMES.items():
            if any(e.get(metric) is not None for s in steps for e in s.get("per_task", [])):
                table = step_table(results, metric).split("\n\n", 1)[-1]
                body += [f"<h2>{html.escape(title)} per step</h2>", markdown_tables_to_html(table)]
    else:
        body.append('<p class="note">No evaluation step was recorded in results.json.</p>')
    timings = _timings(results)
    if timings:
        body += ["<h2>Timings</h2>", "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in timings) + "</ul>"]
    plots = sorted((run_dir / "plots").glob("*.png"), key=_plot_order) if (run_dir / "plots").is_dir() else []
    if plots:
        body.append("<h2>Figures</h2>")
        section = None
        for p in plots:
            key = _plot_order(p)
            if key[0] == 1 and key[1] != section:  # a heading per task
                section = key[1]
                names = results.get("tasks", [])
                name = " + ".join(names[section]) if section < len(names) else ""
                body.append(f"<h3>Task {section}: {html.escape(name)}</h3>")
            body.append(_figure(p))
    config = run_dir / "config.yaml"
    if config.is_file():
        body += ["<h2>Configuration</h2>", "<details><summary>config.yaml (resolved)</summary>",
                 f"<pre>{html.escape(config.read_text(errors='replace'))}</pre></details>"]
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>moleflow report: {html.escape(run_dir.resolve().name)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
    path = run_dir / "report.html"
    atomic_write_text(path, page)
    return path
