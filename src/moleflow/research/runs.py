"""Reading finished run directories for `moleflow report` (`compare.py`).

The file names of a run directory are `results/rundir.py`'s; this module owns how runs are told apart
(the dotted flattening of config.yaml, the keys that are not settings), which `grid.py` shares. A run's
results.json is read for its `final` values of `REPORTED` only, so a hand-written or partial final block
still compares; a results.json of an unknown format version is skipped with the reason.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moleflow.results.rundir import CONFIG_FILE, DONE_MARKER, GRID_FILE, RESULTS_FILE
from moleflow.results.schema import METRICS, ROUTING, ResultsFormatError, check_format_version

SEED_KEY = "train.seed"

# Keys that say how a run is shown, cached or placed, not what was trained: two runs that differ only
# here are the same setting. A key matches an entry when it equals it or lies below it. data.root is
# NOT here: two folder datasets differ only in their root, and merging them would be silently wrong.
NON_SETTING_KEYS = ("output", "backbone.cache_dir", "train.device")

# The final values compared, in column order (results.json `final` keys and headers from the registry).
REPORTED = (*METRICS, ROUTING)


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
    res_path, cfg_path = path / RESULTS_FILE, path / CONFIG_FILE
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
    try:
        check_format_version(results, "results.json")
    except ResultsFormatError as exc:
        return Skipped(path, str(exc))
    reason = _finished_reason(results)
    if reason:
        return Skipped(path, reason)
    final = {m.key: results["final"].get(m.key) for m in REPORTED}
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
