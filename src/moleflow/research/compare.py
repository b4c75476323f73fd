"""`moleflow report`: compare finished run directories in grouped Markdown tables.

The rules follow the notes' experiment-results.md: runs are compared only within a group of equal values
of the `group_by` keys (lr, lambda_logdet, context kernel …), ranked by image AUROC, and a baseline's
deltas are shown in percentage points. Runs whose configs differ only in `train.seed` are one *setting*
and are reported as mean ± std over their seeds. Reading the run directories is `runs.py`; its names that
`grid.py` uses stay importable from here.
"""
from __future__ import annotations

import difflib
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moleflow.config import Config, ConfigError, config_to_dict, parse_override
from moleflow.research.runs import (
    REPORTED,
    SEED_KEY,
    Run,
    collect_runs,
    flatten,
    hashable_value,
    is_non_setting,
    show_value,
    split_top_level,
)
from moleflow.results.schema import get_metric
from moleflow.results.tables import Table, fmt, markdown_table


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
    """Image AUROC and pixel AP of each setting, and their differences to the baseline's."""
    keys = ("image_auroc", "pixel_ap")
    labels = [get_metric(k).short for k in keys]
    header = ["Setting", *labels, *[f"Δ {label} (pp)" for label in labels]]
    rows = [[f"{base.label} (baseline)", *[fmt(base.mean(k)) for k in keys], *["-"] * len(keys)]]
    for s in settings:
        if s is not base:
            rows.append([s.label, *[fmt(s.mean(k)) for k in keys], *[_delta(s.mean(k), base.mean(k)) for k in keys]])
    return markdown_table(Table(header, rows))


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
    header = ["Rank", "Setting", *[m.short for m in REPORTED], "n seeds"]
    rows = [[str(i), s.label, *[s.cell(m.key) for m in REPORTED], str(len(s.runs))] for i, s in enumerate(settings, 1)]
    return markdown_table(Table(header, rows))


def _overview(group_by: list[str], ordered: list[tuple[tuple, list[Setting]]]) -> list[str]:
    """The lines above the groups: what the numbers are and, when grouped, a table of the groups."""
    parts = ["# Run comparison", "",
             "Final metrics after the last task (routing on); mean ± std over seeds (sample std, ddof=1) "
             "where a setting has several seeds; Δ in percentage points.", ""]
    if not group_by:
        return parts + ["Grouped by: nothing (all runs in one group).", ""]
    header = ["Group", *group_by, "settings", "runs"]
    rows = [[str(i), *[show_value(s_list[0].config.get(k)) for k in group_by], str(len(s_list)), str(sum(len(s.runs) for s in s_list))]
            for i, (_, s_list) in enumerate(ordered, 1)]
    return parts + [f"Grouped by: {', '.join(group_by)} — settings are compared only within a group.", "",
                    markdown_table(Table(header, rows)), ""]


@dataclass
class _BaselineSearch:
    name: str
    found: bool = False
    ambiguous: list[str] = field(default_factory=list)


def _group_section(i: int, s_list: list[Setting], group_by: list[str], search: _BaselineSearch | None, n_groups: int) -> list[str]:
    """One group: its settings ranked, their runs, and the delta table against the baseline when it is here."""
    varying = _varying_keys(s_list)
    for s in s_list:
        s.label = _label(s, varying)
    s_list.sort(key=_rank_key)
    title = ", ".join(f"{k}={show_value(s_list[0].config.get(k))}" for k in group_by) if group_by else "all runs"
    parts = [f"## Group {i}: {title}", "", ranking_table(s_list), ""]
    parts += ["Runs:", *[f"- {s.label}: {_run_names(s)}" for s in s_list], ""]
    if search is None:
        return parts
    base, note = find_baseline(search.name, s_list)
    if base is not None:
        search.found = True
        if len(s_list) > 1:
            parts += [f"### Δ against {base.label}", "", delta_table(s_list, base), ""]
        return parts
    if "matches" in note:
        search.ambiguous.append(f"group {i}: {note}")
    if n_groups > 1:
        parts += [f"No delta table: {note}.", ""]
    return parts


def _baseline_not_found(search: _BaselineSearch, runs: list[Run]) -> ConfigError:
    if search.ambiguous:
        return ConfigError(f"baseline '{search.name}' is ambiguous ({search.ambiguous[0]}); add the other varying keys, "
                           "e.g. 'loss.tail_weight=0, model.context_kernel=3', or give a run directory name")
    names = sorted(r.name for r in runs)
    return ConfigError(f"baseline '{search.name}' matches no run or setting; run names: {', '.join(names[:10])}"
                       + (" …" if len(names) > 10 else ""))


def compare_runs(run_dirs: list[Path], group_by: list[str], baseline: str | None) -> str:
    """Markdown comparing run directories: per group of equal `group_by` values, settings ranked by image
    AUROC (mean ± std over seeds) and, where `baseline` names a run or setting of the group, its deltas."""
    group_by = [k.strip() for k in group_by if k.strip()]
    runs, skipped = collect_runs(run_dirs)
    _check_group_by(group_by, runs)
    groups: dict[tuple, list[Setting]] = {}
    for s in group_settings(runs):
        groups.setdefault(tuple(hashable_value(s.config.get(k)) for k in group_by), []).append(s)
    ordered = sorted(groups.items(), key=lambda kv: [_order(v) for v in kv[0]])

    parts = _overview(group_by, ordered)
    if not runs:
        parts += ["No finished runs to compare.", ""]
    search = _BaselineSearch(baseline) if baseline else None
    for i, (_, s_list) in enumerate(ordered, 1):
        parts += _group_section(i, s_list, group_by, search, len(ordered))
    if search is not None and runs and not search.found:
        raise _baseline_not_found(search, runs)
    if skipped:
        parts += ["## Skipped", "", *[f"- `{s.path}`: {s.reason}" for s in skipped], ""]
    return "\n".join(parts)
