"""Builders of results.json parts for tests, in the layout the jobs write (see moleflow.results.schema)."""
from __future__ import annotations

import json
from pathlib import Path

from moleflow.results.schema import METRIC_KEYS, RunResults, Step, summarize

RESULTS_V1 = Path(__file__).parent / "data" / "results_v1"  # results.json files written before format_version


def metrics(image_auroc: float | None, pixel: float | None = None) -> dict:
    """A metrics mapping; pixel AUROC/AP/AUPRO derived from `pixel` (None: a dataset without masks)."""
    values = (image_auroc, pixel, None if pixel is None else pixel / 2, pixel)
    return dict(zip(METRIC_KEYS, values))


def task_entry(task: int, classes: list[str], image_auroc: float | None, pixel: float | None = None,
               routing: float | None = 1.0, n_test: int = 10, oracle_auroc: float | None = None) -> dict:
    """An evaluated task of a step, as evaluate_task + evaluate_seen leave it."""
    m = metrics(image_auroc, pixel)
    oracle = metrics(image_auroc if oracle_auroc is None else oracle_auroc, pixel)
    return {"task": task, **m, "routing_accuracy": routing, "oracle": oracle,
            "per_class": {c: dict(m) for c in classes}, "n_test": n_test, "n_defective": n_test // 2, "classes": classes}


def skipped_entry(task: int, classes: list[str], reason: str = "test data not available") -> dict:
    return {"task": task, "classes": classes, "skipped": reason}


def typed_steps(steps: list[dict]) -> list[Step]:
    return [Step.from_json(s) for s in steps]


def run_results(tasks: list[list[str]], steps: list[dict], **extra) -> RunResults:
    """Typed results of `steps` (dicts) with their summary as the final block."""
    data = {"tasks": tasks, "steps": steps, "final": summarize(typed_steps(steps)).to_json(), **extra}
    return RunResults.from_json(data)


def real_results_text(name: str) -> str:
    """A results.json written by the jobs before format_version existed (fit, eval, ogp)."""
    return (RESULTS_V1 / f"{name}.json").read_text()


def real_results(name: str) -> dict:
    return json.loads(real_results_text(name))
