"""The jobs behind the command line: fit a scenario, add a task to a saved model, evaluate a saved model.

Each job reads images through `data/`, features through `features/` (once per image), learns through
the method of `methods.py`, and writes a run directory: the resolved `config.yaml`, `results.json`,
`results.md`, plots and the model in `model/`.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from moleflow.config import Config, ConfigError, config_to_dict, save_config
from moleflow.continual.evaluate import evaluate_task
from moleflow.continual.methods import METHODS
from moleflow.continual.scenario import display_name, resolve_tasks
from moleflow.continual.system import (
    System,
    build_system,
    learn_new_task,
    load_system,
    save_system,
    saved_config,
    task_features,
)
from moleflow.continual.train import seed_everything
from moleflow.features.cache import FeatureSet
from moleflow.model import checkpoint
from moleflow.results.summary import summarize
from moleflow.scoring import Scores


def evaluate_seen(
    system: System, test_sets: dict[int, FeatureSet | None], names: dict[int, list[str]], single_model_task: int | None = None
) -> tuple[list[dict], dict[int, Scores]]:
    """Evaluate every scenario task in `test_sets` (routing on, and oracle); `names` are their classes."""
    per_task, scores = [], {}
    scorer = system.scorer
    for t, fs in sorted(test_sets.items()):
        if fs is None:
            per_task.append({"task": t, "classes": names[t], "skipped": "test data not available"})
            continue
        res, sc = evaluate_task(scorer, fs, t, single_model_task)
        res["classes"] = names[t]
        per_task.append(res)
        scores[t] = sc
    return per_task, scores


def write_results(run_dir: Path, results: dict, cfg: Config, skipped: list[tuple[str, str]] | None = None) -> None:
    from moleflow.results.schema import RunResults
    from moleflow.results.tables import results_markdown

    if skipped:
        results["skipped_files"] = [{"path": p, "reason": r} for p, r in skipped]
    typed = RunResults.from_json(results)  # checks the layout; the file gets its format_version
    checkpoint.atomic_write_text(run_dir / "results.json", json.dumps(typed.to_json(), indent=2))
    checkpoint.atomic_write_text(run_dir / "results.md", results_markdown(typed))
    save_config(cfg, run_dir / "config.yaml")


def _plot(run_dir: Path, system: System, results: dict, test_sets: dict, scores: dict, names: dict[int, list[str]], progress: bool) -> None:
    """PNG figures and report.html of the run (config `output.plots`)."""
    if not system.cfg.output.plots:
        return
    from moleflow.results.html import write_report_html
    from moleflow.results.plots import TaskView, write_run_plots
    from moleflow.results.schema import RunResults

    views = []
    for t, sc in sorted(scores.items()):
        fs = test_sets[t]
        views.append(TaskView(
            task=t,
            name="+".join(names[t]),
            labels=fs.labels.numpy(),
            scores=sc.image.numpy(),
            threshold=system.tasks[min(t, len(system.tasks) - 1)].threshold,  # baselines have one model task
            paths=list(fs.paths),
            maps=sc.maps.numpy(),
            masks=None if fs.masks is None else fs.masks[:, 0].numpy().astype(bool),
            routed=sc.tasks.numpy(),
        ))
    typed = RunResults.from_json(results)
    write_run_plots(run_dir, typed, views, system.cfg.data.image_size, system.cfg.output.panels_per_task)
    write_report_html(run_dir, typed)


def _resume_state(cfg: Config, run_dir: Path) -> tuple[System, dict] | None:
    """The saved system and results of an interrupted `fit`, or None when nothing was completed."""
    model_dir = run_dir / "model"
    if not (model_dir / checkpoint.MANIFEST).is_file():
        return None
    if not METHODS[cfg.method].resumable:
        raise ConfigError(f"--resume continues method: moleflow runs; {run_dir} is a '{cfg.method}' run, start it again")
    saved = saved_config(model_dir)
    mine = config_to_dict(cfg)
    diff = [k for k in mine if k != "output" and mine[k] != saved.get(k)]
    if diff:
        raise ConfigError(f"--resume: {run_dir} was started with another config (sections {', '.join(diff)} differ); resume with the same config or use a new --out")
    system = load_system(model_dir)
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"steps": []}
    return system, results


def run_fit(cfg: Config, run_dir: Path, progress: bool = True, echo=print, resume: bool = False) -> dict:
    """Train the configured scenario task by task with `cfg.method` (methods.py), evaluating every seen
    task after each one. The model is saved after every task, so `resume=True` continues an interrupted
    run from the last completed task; every task is seeded on its own (system.py), so the results equal
    an uninterrupted run's.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    method = METHODS[cfg.method]
    tasks = resolve_tasks(cfg)
    names = {t: [display_name(s) for s in specs] for t, specs in enumerate(tasks)}
    results = {"method": cfg.method, "tasks": list(names.values()), "task_specs": tasks, "steps": [],
               "timings": {"features_s": 0.0, "train_s_per_task": [], "eval_s": 0.0}}
    state = _resume_state(cfg, run_dir) if resume else None
    if state is None:
        save_config(cfg, run_dir / "config.yaml")
        seed_everything(cfg.train.seed)  # the shared flow's initialisation
        system = build_system(cfg)
        done = 0
    else:
        system, saved = state
        done = len(system.tasks)
        if [r.specs for r in system.tasks] != tasks[:done]:
            raise ConfigError(f"--resume: the tasks saved in {run_dir / 'model'} are not the start of this scenario")
        results["steps"] = [s for s in saved["steps"] if s["after_task"] < done]
        results["timings"] = saved.get("timings", results["timings"])
        results["timings"]["train_s_per_task"] = results["timings"]["train_s_per_task"][:done]
        echo(f"resuming {run_dir}: {done} of {len(tasks)} tasks completed")
    test_sets: dict[int, FeatureSet | None] = {}
    trains: dict[int, FeatureSet] = {}
    scores: dict = {}
    for t, specs in enumerate(tasks):
        t0 = time.perf_counter()
        if t < done:  # completed before the interruption: only its test set is needed again
            test_sets[t] = task_features(system, specs, "test", progress)
            results["timings"]["features_s"] += time.perf_counter() - t0
            if t == done - 1 and len(results["steps"]) < done:  # killed after saving, before evaluating
                per_task, scores = evaluate_seen(system, test_sets, names, method.scoring_task)
                results["steps"].append({"after_task": t, "per_task": per_task, "train": {}})
                results["final"] = summarize(results["steps"])
                write_results(run_dir, results, cfg, system.skipped)
            continue
        trains[t] = task_features(system, specs, "train", progress)
        test_sets[t] = task_features(system, specs, "test", progress)
        results["timings"]["features_s"] += time.perf_counter() - t0
        log = method.learn(system, t, tasks, trains, progress)
        if log is None:
            continue
        results["timings"]["train_s_per_task"].append(log["seconds"])
        t0 = time.perf_counter()
        per_task, scores = evaluate_seen(system, test_sets, names, method.scoring_task)
        results["timings"]["eval_s"] += time.perf_counter() - t0
        results["steps"].append({"after_task": t, "per_task": per_task, "train": log})
        results["final"] = summarize(results["steps"])
        if cfg.output.save_model:
            save_system(system, run_dir / "model", new_tasks=[len(system.tasks) - 1])
        write_results(run_dir, results, cfg, system.skipped)
        echo(step_line(results["steps"][-1]))
    if not scores:  # a resumed run that had already finished: score once more for the figures
        _, scores = evaluate_seen(system, test_sets, names, method.scoring_task)
    _plot(run_dir, system, results, test_sets, scores, names, progress)
    return results


def step_line(step: dict) -> str:
    from moleflow.results import schema, tables

    return tables.step_line(schema.Step.from_json(step))


def run_add_task(model_dir: Path, specs: list[str], roots: dict[str, str], run_dir: Path | None, progress: bool = True, echo=print) -> dict:
    """Learn one new task on a saved model from the new images only; evaluate every task with routing."""
    model_dir = Path(model_dir)
    system = load_system(model_dir)
    method = METHODS[system.cfg.method]
    if not method.extendable:
        raise ConfigError(f"{model_dir} is a '{method.name}' baseline; add-task needs a model trained with method: moleflow")
    cfg = dataclasses.replace(system.cfg, data=dataclasses.replace(system.cfg.data, roots={**system.cfg.data.roots, **roots}))
    system.cfg = cfg
    known = {c for r in system.tasks for c in r.specs}
    for s in specs:
        if s in known or display_name(s) in {r2 for r in system.tasks for r2 in r.classes}:
            raise ConfigError(f"class '{s}' is already a task of {model_dir}; add-task takes classes the model has not learned")
    run_dir = Path(run_dir) if run_dir else model_dir.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    prev_path = run_dir / "results.json"
    results = json.loads(prev_path.read_text()) if prev_path.is_file() else {
        "tasks": [r.classes for r in system.tasks], "task_specs": [r.specs for r in system.tasks],
        "steps": [], "timings": {"features_s": 0.0, "train_s_per_task": [], "eval_s": 0.0}}
    t0 = time.perf_counter()
    train = task_features(system, specs, "train", progress)
    new_test = task_features(system, specs, "test", progress)
    results["timings"]["features_s"] += time.perf_counter() - t0
    t, log = learn_new_task(system, specs, train, progress, step=len(system.tasks))
    results["timings"]["train_s_per_task"].append(log["seconds"])
    test_sets: dict[int, FeatureSet | None] = {}
    for rec in system.tasks[:-1]:
        try:
            test_sets[rec.index] = task_features(system, list(rec.specs), "test", progress)
        except (ConfigError, ValueError, FileNotFoundError) as exc:
            echo(f"note: task {rec.index} ({'+'.join(rec.classes)}) not evaluated: {exc}")
            test_sets[rec.index] = None
    test_sets[t] = new_test
    t0 = time.perf_counter()
    names = {r.index: r.classes for r in system.tasks}
    per_task, scores = evaluate_seen(system, test_sets, names)
    results["timings"]["eval_s"] += time.perf_counter() - t0
    results["tasks"].append([display_name(s) for s in specs])
    results.setdefault("task_specs", []).append(list(specs))
    results["steps"].append({"after_task": t, "per_task": per_task, "train": log})
    results["final"] = summarize(results["steps"])
    save_system(system, model_dir, new_tasks=[t])
    write_results(run_dir, results, cfg, system.skipped)
    echo(step_line(results["steps"][-1]))
    _plot(run_dir, system, results, test_sets, scores, names, progress)
    return results


def run_evaluate(model_dir: Path, cfg: Config | None, run_dir: Path, progress: bool = True, echo=print) -> dict:
    """Evaluate a saved model on the test sets of its tasks (data locations from `cfg` when given)."""
    system = load_system(model_dir)
    if cfg is not None:  # where the test data lies; the model's own settings stay
        system.cfg = dataclasses.replace(system.cfg, data=cfg.data)
    test_sets = {r.index: task_features(system, list(r.specs), "test", progress) for r in system.tasks}
    names = {r.index: r.classes for r in system.tasks}
    per_task, scores = evaluate_seen(system, test_sets, names, METHODS[system.cfg.method].scoring_task)
    results = {"tasks": [r.classes for r in system.tasks], "steps": [{"after_task": len(system.tasks) - 1, "per_task": per_task}]}
    results["final"] = summarize(results["steps"])
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_results(run_dir, results, system.cfg)
    echo(step_line(results["steps"][-1]))
    _plot(run_dir, system, results, test_sets, scores, names, progress)
    return results
