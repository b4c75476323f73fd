"""`moleflow grid`: run the cartesian product of `--vary` values × seeds, one run after another, resumable.

    out/
      grid.json                                  the runs and their overrides (read by `moleflow report`)
      loss.tail_weight=0__train.seed=1/          a normal run directory (config.yaml, results.json, model/)
        DONE                                     written after run_fit returned: the run is complete
      ...

Every combination is loaded (and so checked) before the first run starts, so a typo in a key or a value
out of range fails at once instead of after hours of training. Re-running the same command skips the
finished runs and starts unfinished ones again from scratch.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moleflow.config import Config, ConfigError, config_to_dict, load_config, parse_override
from moleflow.research.runs import SEED_KEY, flatten, hashable_value, is_non_setting, split_top_level
from moleflow.results.rundir import GRID_FILE, RunDir, write_grid_listing
from moleflow.results.schema import RunResults

MAX_NAME = 150  # characters of a run directory name; longer names are cut and get a hash suffix
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+\-]")  # anything else (/, spaces, brackets, quotes, :) becomes _


@dataclass
class GridRun:
    name: str  # directory name under the grid folder
    overrides: list[str]  # the varied settings and the seed, as `key=value` texts
    cfg: Config


def parse_vary(item: str) -> tuple[str, list[str]]:
    """'loss.tail_weight=0,0.7' -> ('loss.tail_weight', ['0', '0.7']); commas inside [..] do not split."""
    if "=" not in item:
        raise ConfigError(f"--vary '{item}' must look like key=v1,v2 (for example loss.tail_weight=0,0.7)")
    key, raw = item.split("=", 1)
    key = key.strip()
    values = [v.strip() for v in split_top_level(raw)]
    if not key:
        raise ConfigError(f"--vary '{item}' has no key")
    if any(v == "" for v in values):
        raise ConfigError(f"--vary '{item}' has an empty value; separate values with single commas")
    seen: dict[Any, str] = {}
    for v in values:
        parsed = hashable_value(parse_override(f"{key}={v}")[1])
        if parsed in seen:
            raise ConfigError(f"--vary '{item}' lists the value {v} twice (as '{seen[parsed]}' and '{v}')")
        seen[parsed] = v
    return key, values


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; '' -> [] (the config's own seed)."""
    seeds = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            seeds.append(int(part))
        except ValueError:
            raise ConfigError(f"--seeds '{text}': '{part}' is not an integer; give seeds like 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds '{text}' repeats a seed")
    return seeds


def safe_name(text: str) -> str:
    """A readable, filesystem-safe directory name for a `key=value` text."""
    name = _UNSAFE.sub("_", text)
    if len(name) > MAX_NAME:
        name = name[: MAX_NAME - 9] + "~" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return name


def run_name(overrides: list[str]) -> str:
    return safe_name("__".join(overrides)) if overrides else "base"


def plan_grid(config: Path, vary: list[str], seeds: list[int], overrides: list[str] | tuple[str, ...] = ()) -> list[GridRun]:
    """Every run of the grid with its loaded config; raises ConfigError before anything runs."""
    axes: list[list[str]] = []
    keys: list[str] = []
    for item in vary:
        key, values = parse_vary(item)
        if key in keys:
            raise ConfigError(f"--vary names '{key}' twice; give all its values in one --vary {key}=v1,v2")
        if key == SEED_KEY and seeds:
            raise ConfigError(f"'{SEED_KEY}' is both in --vary and --seeds; use --seeds only")
        # Load the base config with this key alone first: a typo then fails with the key's own message.
        load_config(config, [*overrides, f"{key}={values[0]}"])
        keys.append(key)
        axes.append([f"{key}={v}" for v in values])
    if seeds:
        axes.append([f"{SEED_KEY}={s}" for s in seeds])

    runs: list[GridRun] = []
    names: set[str] = set()
    for combo in itertools.product(*axes):
        combo = list(combo)
        name = run_name(combo)
        if name in names:  # two values that differ only in characters replaced by '_'
            name = safe_name(name[: MAX_NAME - 9] + "~" + hashlib.sha1("__".join(combo).encode()).hexdigest()[:8])
        names.add(name)
        try:
            cfg = load_config(config, [*overrides, *combo])
        except ConfigError as exc:
            raise ConfigError(f"grid run {name}: {exc}") from None
        runs.append(GridRun(name, combo, cfg))
    return runs


def is_finished(run_dir: Path) -> bool:
    return RunDir(run_dir).is_done()


def _setting_diff(saved: dict, planned: dict) -> list[str]:
    """Keys (that change what is trained) whose saved value differs from the planned one."""
    a, b = flatten(saved), flatten(planned)
    keys = sorted(k for k in set(a) | set(b) if not is_non_setting(k) and hashable_value(a.get(k)) != hashable_value(b.get(k)))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


def _check_not_stale(out: Path, runs: list[GridRun]) -> None:
    """A finished run made with another config (the YAML was edited since) must not be silently reused."""
    for r in runs:
        d = RunDir(out / r.name)
        if not (d.is_done() and d.config_file.is_file()):
            continue
        diff = _setting_diff(d.read_config(), config_to_dict(r.cfg))
        if diff:
            raise ConfigError(
                f"{d} is a finished run made with a different config ({'; '.join(diff[:3])}{' …' if len(diff) > 3 else ''}); "
                f"use another --out or delete that run directory"
            )


def _write_listing(out: Path, config: Path, vary: list[str], seeds: list[int], overrides: list[str],
                   runs: list[GridRun], status: dict[str, str]) -> None:
    """grid.json: this grid's runs, plus runs listed by an earlier grid in the same folder."""
    earlier: list[dict] = []
    path = out / GRID_FILE
    if path.is_file():
        try:
            earlier = [e for e in json.loads(path.read_text()).get("runs", []) if isinstance(e, dict) and "name" in e]
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            earlier = []
    planned = {r.name for r in runs}
    listing = {
        "config": str(Path(config).resolve()),
        "overrides": list(overrides),
        "vary": list(vary),
        "seeds": list(seeds),
        "runs": [{"name": r.name, "overrides": r.overrides, "status": status.get(r.name, "pending")} for r in runs]
        + [e for e in earlier if e["name"] not in planned],
    }
    write_grid_listing(out, listing)


def _image_auroc(results: RunResults | None) -> float | None:
    return None if results is None or results.final is None else results.final.routed.get("image_auroc")


def _show(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def run_grid(
    config: Path,
    vary: list[str],
    seeds: list[int],
    out: Path,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    fit: Callable[..., Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> list[Path]:
    """Run every combination of `vary` values × `seeds` under `out`; returns the run directories in order.

    `overrides` apply to every run (e.g. data.root=...). `fit(cfg, run_dir, progress=, echo=)` trains one
    run (default `moleflow.continual.jobs.run_fit`); an exception stops the grid, and that run starts again
    from scratch on the next call.
    """
    if fit is None:
        from moleflow.continual.jobs import run_fit as fit
    out = Path(out)
    overrides = list(overrides)
    runs = plan_grid(Path(config), vary, seeds, overrides)
    _check_not_stale(out, runs)
    out.mkdir(parents=True, exist_ok=True)
    status = {r.name: "done" for r in runs if is_finished(out / r.name)}
    _write_listing(out, config, vary, seeds, overrides, runs, status)

    n = len(runs)
    for i, r in enumerate(runs, 1):
        d = out / r.name
        tag = f"[{i}/{n}] {r.name}"
        if is_finished(d):
            try:
                earlier = RunDir(d).read_results()
            except ConfigError:
                earlier = None
            echo(f"{tag}: skipped (finished earlier, image AUROC {_show(_image_auroc(earlier))})")
            continue
        if d.exists():
            echo(f"{tag}: unfinished earlier run removed, starting again")
            shutil.rmtree(d)
        echo(f"{tag}: started")
        t0 = time.perf_counter()
        results = fit(r.cfg, d, progress=progress, echo=echo)
        seconds = time.perf_counter() - t0
        RunDir(d).mark_done(seconds)
        status[r.name] = "done"
        _write_listing(out, config, vary, seeds, overrides, runs, status)
        echo(f"{tag}: done in {seconds:.0f} s, image AUROC {_show(_image_auroc(results if isinstance(results, RunResults) else None))}")
    echo(f"grid: {n} run(s) in {out}; compare them with: moleflow report {out}")
    return [out / r.name for r in runs]
