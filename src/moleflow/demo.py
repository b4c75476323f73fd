"""`moleflow demo`: the first thing a new user runs.

Learns ELPV `mono` cells, then `poly` cells, with the offline backbone, evaluates both with routing on,
and optionally appends an MVTec-layout class folder (`--add PATH`) as a third task. Prints the per-step
table and the run directory; the saved model accepts further products with `moleflow add-task`.
"""
from __future__ import annotations

import dataclasses
import time
from importlib import resources
from pathlib import Path

from moleflow.config import load_config
from moleflow.data import DatasetError


def demo_config_path() -> Path:
    return Path(str(resources.files("moleflow") / "configs" / "demo.yaml"))


def run_demo(run_dir: Path, add: Path | None, overrides: list[str], progress: bool = True) -> int:
    from moleflow.continual import jobs
    from moleflow.results.tables import decision_table, markdown_table, step_table

    if add is not None:
        add = Path(add)
        if not (add / "train" / "good").is_dir():
            raise DatasetError(f"--add {add}: not an MVTec-layout class folder (no {add / 'train' / 'good'})")
    cfg = load_config(demo_config_path(), overrides)
    if add is not None:
        # The third product joins the same continual run (task by task, no access to earlier images);
        # learning it in this process reuses the earlier tasks' test features for the evaluation.
        cfg = dataclasses.replace(
            cfg, scenario=dataclasses.replace(cfg.scenario, tasks=[*cfg.scenario.tasks, [f"mvtec:{add.resolve().name}"]]),
            data=dataclasses.replace(cfg.data, roots={**cfg.data.roots, "mvtec": str(add.resolve().parent)}))
    t0 = time.perf_counter()
    results = jobs.run_fit(cfg, run_dir, progress=progress)
    seconds = time.perf_counter() - t0
    print()
    print(step_table(results))
    if results.has_values("pixel_ap"):
        print()
        print(step_table(results, "pixel_ap"))
    decisions = decision_table(results)
    if decisions is not None:
        print("\nDecisions at the shipped thresholds (routing on)\n")
        print(markdown_table(decisions))
    print(f"\ndemo took {seconds / 60:.1f} min ({seconds:.0f} s)")
    print(f"run directory: {run_dir}")
    report = Path(run_dir) / "report.html"
    if report.exists():
        print(f"report: {report}")
    return 0
