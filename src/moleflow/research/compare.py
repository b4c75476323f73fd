"""`moleflow report`: compare finished run directories in grouped Markdown tables.

The rules follow the notes' experiment-results.md: runs are compared only within a group of equal values
of the `group_by` keys (lr, lambda_logdet, context kernel …), ranked by image AUROC, and a baseline's
deltas are shown in percentage points. Runs whose configs differ only in `train.seed` are one *setting*
and are reported as mean ± std over their seeds.

This module also owns what a run directory looks like from the outside (the `DONE` marker, `grid.json`,
the dotted flattening of config.yaml), so `grid.py` imports these names from here.
"""
from __future__ import annotations

import difflib
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moleflow.config import Config, ConfigError, config_to_dict, parse_override
from moleflow.results.tables import _table, fmt

DONE_MARKER = "DONE"  # written by `moleflow grid` after run_fit returned: the run is complete
GRID_FILE = "grid.json"  # a grid folder: lists its runs and their overrides
SEED_KEY = "train.seed"

# Keys that say how a run is shown, cached or placed, not what was trained: two runs that differ only
# here are the same setting. A key matches an entry when it equals it or lies below it. data.root is
# NOT here: two folder datasets differ only in their root, and merging them would be silently wrong.
NON_SETTING_KEYS = ("output", "backbone.cache_dir", "train.device")

# The final metrics shown, in table order: results.json `final` key -> column header.
COLUMNS = {
    "image_auroc": "Img AUROC",
    "pixel_auroc": "Pix AUROC",
    "pixel_ap": "Pix AP",
    "aupro": "AUPRO",
    "routing_accuracy": "Routing",
}


# --------------------------------------------------------------------------- helpers shared with grid.py


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4}; lists stay values."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            flat.update(flatten(v, key))
        else:
            flat[key] = v
    return flat


def is_non_setting(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in NON_SETTING_KEYS)


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets and quotes: 'a,[1,2],b' -> ['a', '[1,2]', 'b']."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def hashable_value(v: Any) -> Any:
    """A config value usable as a dict key / in a set (lists and mappings as canonical JSON)."""
    return json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v


def show_value(v: Any) -> str:
    """A config value as a user would type it in an override."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":")).replace('"', "")
    return str(v)


# --------------------------------------------------------------------------- reading runs


@dataclass
class Run:
    name: str
    path: Path
    config: dict[str, Any]  # flattened config.yaml
    final: dict[str, float | None]


@dataclass
class Skipped:
    path: Path
    reason: str


def _finished_reason(results: dict) -> str | None:
    """Why results.json is not a finished run's, or None when it is."""
    steps, tasks = results.get("steps") or [], results.get("tasks") or []
    if not isinstance(results.get("final"), dict):
        return "results.json has no final metrics"
    if steps and tasks and steps[-1].get("after_task") != len(tasks) - 1:
        return f"unfinished: results after task {steps[-1].get('after_task')} of {len(tasks)} tasks (0-based)"
    return None


def load_run(path: Path, need_done: bool = False) -> Run | Skipped:
    """Read one run directory; a problem gives a `Skipped` with the reason instead of an exception."""
    path = Path(path)
    if not path.is_dir():
        return Skipped(path, "no such directory")
    res_path, cfg_path = path / "results.json", path / "config.yaml"
    if not res_path.is_file():
        return Skipped(path, "not finished or not a run directory: results.json is missing")
    if need_done and not (path / DONE_MARKER).is_file():
        return Skipped(path, f"unfinished grid run: no {DONE_MARKER} marker")
    if not cfg_path.is_file():
        return Skipped(path, "config.yaml is missing")
    try:
        results = json.loads(res_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return Skipped(path, f"results.json is unreadable ({exc})")
    try:
        cfg = yaml.safe_load(cfg_path.read_text())
    except yaml.YAMLError as exc:
        return Skipped(path, f"config.yaml is not valid YAML ({exc.__class__.__name__})")
    if not isinstance(results, dict) or not isinstance(cfg, dict):
        return Skipped(path, "results.json or config.yaml does not hold a mapping")
    reason = _finished_reason(results)
    if reason:
        return Skipped(path, reason)
    final = {k: results["final"].get(k) for k in COLUMNS}
    return Run(path.name, path, flatten(cfg), final)


def _grid_members(grid_dir: Path) -> list[Path] | Skipped:
    try:
        listing = json.loads((grid_dir / GRID_FILE).read_text())
        return [grid_dir / r["name"] for r in listing["runs"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        return Skipped(grid_dir, f"{GRID_FILE} is unreadable ({exc.__class__.__name__}: {exc})")


def collect_runs(run_dirs: list[Path]) -> tuple[list[Run], list[Skipped]]:
    """Load the given directories; a grid folder (with grid.json) stands for its runs."""
    runs: list[Run] = []
    skipped: list[Skipped] = []
    seen: set[Path] = set()
    for d in run_dirs:
        d = Path(d)
        if (d / GRID_FILE).is_file():
            members = _grid_members(d)
            if isinstance(members, Skipped):
                skipped.append(members)
                continue
            items = [(m, True) for m in members]
        else:
            items = [(d, (d.parent / GRID_FILE).is_file())]  # a grid's run given on its own needs DONE too
        for path, need_done in items:
            key = path.resolve()
            if key in seen:  # the same run given twice (directly and through its grid) counts once
                continue
            seen.add(key)
            r = load_run(path, need_done)
            (runs if isinstance(r, Run) else skipped).append(r)
    # Directory names are the run names; two grids both holding "loss.tail_weight=0" need their parent.
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.name] = counts.get(r.name, 0) + 1
    for r in runs:
        if counts[r.name] > 1:
            r.name = f"{r.path.parent.name}/{r.path.name}"
    return runs, skipped


# --------------------------------------------------------------------------- settings and groups


def _setting_items(run: Run) -> dict[str, Any]:
    return {k: v for k, v in run.config.items() if k != SEED_KEY and not is_non_setting(k)}


@dataclass
class Setting:
    """Runs with equal configs apart from the seed (and paths/output keys)."""

    config: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    label: str = ""

    def values(self, metric: str) -> list[float]:
        out = []
        for r in self.runs:
            v = r.final.get(metric)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.append(float(v))
        return out

    def mean(self, metric: str) -> float | None:
        vals = self.values(metric)
        return sum(vals) / len(vals) if vals else None

    def std(self, metric: str) -> float | None:
        vals = self.values(metric)
        return statistics.stdev(vals) if len(vals) > 1 else None  # ddof=1

    def cell(self, metric: str) -> str:
        m, s = self.mean(metric), self.std(metric)
        return fmt(m) if s is None else f"{fmt(m)} ± {fmt(s)}"


def group_settings(runs: list[Run]) -> list[Setting]:
    settings: dict[tuple, Setting] = {}
    for r in runs:
        items = _setting_items(r)
        key = tuple(sorted((k, hashable_value(v)) for k, v in items.items()))
        settings.setdefault(key, Setting(items)).runs.append(r)
    for s in settings.values():
        s.runs.sort(key=lambda r: (r.config.get(SEED_KEY) if isinstance(r.config.get(SEED_KEY), int) else 0, r.name))
    return list(settings.values())


def _varying_keys(settings: list[Setting]) -> list[str]:
    keys = sorted({k for s in settings for k in s.config})
    return [k for k in keys if len({hashable_value(s.config.get(k)) for s in settings}) > 1]


def _label(setting: Setting, varying: list[str]) -> str:
    if varying:
        return ", ".join(f"{k}={show_value(setting.config.get(k))}" for k in varying)
    names = [r.name for r in setting.runs]
    return names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} seeds)"


def _check_group_by(group_by: list[str], runs: list[Run]) -> None:
    known = set(flatten(config_to_dict(Config()))) | {k for r in runs for k in r.config}
    for key in group_by:
        if key == SEED_KEY:
            raise ConfigError(f"group-by key '{SEED_KEY}': runs that differ only in the seed are averaged, not grouped")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown group-by key '{key}' (use dotted config keys such as train.lr){hint}")


# --------------------------------------------------------------------------- baseline


def _matches_spec(setting: Setting, spec: list[tuple[str, Any]]) -> bool:
    return all(k in setting.config and hashable_value(setting.config[k]) == hashable_value(v) for k, v in spec)


def _parse_spec(baseline: str) -> list[tuple[str, Any]] | None:
    """'loss.tail_weight=0, train.lr=1e-4' or a grid run name 'a=1__b=2' -> [(key, value)]; None if not k=v."""
    parts = [p.strip() for chunk in baseline.split("__") for p in split_top_level(chunk)]
    parts = [p for p in parts if p]
    if not parts or not all("=" in p for p in parts):
        return None
    try:
        return [parse_override(p) for p in parts]
    except ConfigError:
        return None


def find_baseline(baseline: str, settings: list[Setting]) -> tuple[Setting | None, str]:
    """The baseline setting within one group, and a note when there is none or it is ambiguous.

    A run directory name picks that run's setting; otherwise `key=value` pairs (a setting label, or a
    grid run name) pick the one setting of the group with those values. Seeds are ignored in the pairs.
    """
    for s in settings:
        if any(r.name == baseline or r.path.name == baseline for r in s.runs) or s.label.replace(" ", "") == baseline.replace(" ", ""):
            return s, ""
    spec = _parse_spec(baseline)
    if spec is None:
        return None, "the baseline is not in this group"
    spec = [(k, v) for k, v in spec if k != SEED_KEY]
    hits = [s for s in settings if _matches_spec(s, spec)]
    if len(hits) == 1:
        return hits[0], ""
    if len(hits) > 1:
        return None, f"the baseline '{baseline}' matches {len(hits)} settings ({'; '.join(s.label for s in hits[:3])})"
    return None, "the baseline is not in this group"


def _delta(a: float | None, b: float | None) -> str:
    """a - b in percentage points, like the notes' Δ columns."""
    if a is None or b is None:
        return "-"
    return f"{(a - b) * 100:+.2f}"


def delta_table(settings: list[Setting], base: Setting) -> str:
    header = ["Setting", "Img AUROC", "Pix AP", "Δ Img AUROC (pp)", "Δ Pix AP (pp)"]
    rows = [[f"{base.label} (baseline)", fmt(base.mean("image_auroc")), fmt(base.mean("pixel_ap")), "-", "-"]]
    for s in settings:
        if s is base:
            continue
        rows.append([s.label, fmt(s.mean("image_auroc")), fmt(s.mean("pixel_ap")),
                     _delta(s.mean("image_auroc"), base.mean("image_auroc")), _delta(s.mean("pixel_ap"), base.mean("pixel_ap"))])
    return _table(header, rows)


# --------------------------------------------------------------------------- the report


def _order(v: Any) -> tuple:
    """Numbers in numeric order, then everything else by its text."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), "")
    return (1, 0.0, show_value(v))


def _rank_key(s: Setting) -> tuple:
    m = s.mean("image_auroc")
    return (m is None, -(m or 0.0), s.label)


def _run_names(setting: Setting) -> str:
    """The setting's run directories; grid runs that differ only in their seed part are shown once."""
    pattern = re.compile(rf"(^|__){re.escape(SEED_KEY)}=(-?\d+)(?=__|$)")
    stems, seeds = set(), []
    for r in setting.runs:
        m = pattern.search(r.name)
        if m is None:
            return ", ".join(r.name for r in setting.runs)
        stems.add(pattern.sub("", r.name))
        seeds.append(m.group(2))
    if len(stems) != 1 or len(setting.runs) == 1:
        return ", ".join(r.name for r in setting.runs)
    return f"{stems.pop() or '(seed only)'} (seeds {', '.join(seeds)})"


def ranking_table(settings: list[Setting]) -> str:
    header = ["Rank", "Setting", *COLUMNS.values(), "n seeds"]
    rows = [[str(i), s.label, *[s.cell(m) for m in COLUMNS], str(len(s.runs))] for i, s in enumerate(settings, 1)]
    return _table(header, rows)


def compare_runs(run_dirs: list[Path], group_by: list[str], baseline: str | None) -> str:
    """Markdown comparing run directories: per group of equal `group_by` values, settings ranked by image
    AUROC (mean ± std over seeds) and, where `baseline` names a run or setting of the group, its deltas."""
    group_by = [k.strip() for k in group_by if k.strip()]
    runs, skipped = collect_runs(run_dirs)
    _check_group_by(group_by, runs)
    settings = group_settings(runs)

    groups: dict[tuple, list[Setting]] = {}
    for s in settings:
        groups.setdefault(tuple(hashable_value(s.config.get(k)) for k in group_by), []).append(s)
    ordered = sorted(groups.items(), key=lambda kv: [_order(v) for v in kv[0]])

    parts = ["# Run comparison", ""]
    parts.append("Final metrics after the last task (routing on); mean ± std over seeds (sample std, ddof=1) "
                 "where a setting has several seeds; Δ in percentage points.")
    parts.append("")
    if group_by:
        parts.append(f"Grouped by: {', '.join(group_by)} — settings are compared only within a group.")
        parts.append("")
        header = ["Group", *group_by, "settings", "runs"]
        rows = [[str(i), *[show_value(s_list[0].config.get(k)) for k in group_by], str(len(s_list)), str(sum(len(s.runs) for s in s_list))]
                for i, (_, s_list) in enumerate(ordered, 1)]
        parts += [_table(header, rows), ""]
    else:
        parts += ["Grouped by: nothing (all runs in one group).", ""]
    if not runs:
        parts += ["No finished runs to compare.", ""]

    baseline_found = False
    ambiguous: list[str] = []
    for i, (_, s_list) in enumerate(ordered, 1):
        varying = _varying_keys(s_list)
        for s in s_list:
            s.label = _label(s, varying)
        s_list.sort(key=_rank_key)
        title = ", ".join(f"{k}={show_value(s_list[0].config.get(k))}" for k in group_by) if group_by else "all runs"
        parts += [f"## Group {i}: {title}", "", ranking_table(s_list), ""]
        parts += ["Runs:", *[f"- {s.label}: {_run_names(s)}" for s in s_list], ""]
        if baseline:
            base, note = find_baseline(baseline, s_list)
            if base is not None:
                baseline_found = True
                if len(s_list) > 1:
                    parts += [f"### Δ against {base.label}", "", delta_table(s_list, base), ""]
            else:
                if "matches" in note:
                    ambiguous.append(f"group {i}: {note}")
                if len(ordered) > 1:
                    parts += [f"No delta table: {note}.", ""]
    if baseline and runs and not baseline_found:
        if ambiguous:
            raise ConfigError(f"baseline '{baseline}' is ambiguous ({ambiguous[0]}); add the other varying keys, "
                              "e.g. 'loss.tail_weight=0, model.context_kernel=3', or give a run directory name")
        names = sorted(r.name for r in runs)
        raise ConfigError(f"baseline '{baseline}' matches no run or setting; run names: {', '.join(names[:10])}"
                          + (" …" if len(names) > 10 else ""))

    if skipped:
        parts += ["## Skipped", ""]
        parts += [f"- `{s.path}`: {s.reason}" for s in skipped]
        parts.append("")
    return "\n".join(parts)
