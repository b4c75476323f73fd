"""The jobs behind the command line: fit a scenario, add a task to a saved model, evaluate a saved model.

Each job reads images through `data/`, features through `features/` (once per image), learns through
the method of `methods.py`, and writes its run directory through `results/rundir.py`: the resolved
config, the typed results (results.json, results.md) after every step, plots and report.html, and the
model in `model/`.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from moleflow.config import Config, ConfigError, config_to_dict
from moleflow.continual.evaluate import evaluate_task
from moleflow.continual.methods import METHODS
from moleflow.continual.parallel import learn_tasks, ray_module
from moleflow.continual.scenario import display_name, resolve_tasks
from moleflow.continual.system import (
    System,
    build_system,
    first_tasks,
    learn_new_task,
    load_system,
    save_system,
    saved_config,
    task_features,
)
from moleflow.continual.train import seed_everything
from moleflow.features.cache import FeatureSet
from moleflow.model import checkpoint
from moleflow.results.rundir import RunDir
from moleflow.results.schema import RunResults, SkippedFile, Step, TaskEval, Timings, TrainLog, summarize
from moleflow.results.tables import step_line
from moleflow.scoring import Scores, blend_weight, patch_score_label


@dataclass
class RunLog:
    """What a job has recorded so far; `results()` is the typed `RunResults` written after each step."""

    tasks: list[tuple[str, ...]]
    task_specs: list[tuple[str, ...]] | None
    method: str | None = None
    steps: list[Step] = field(default_factory=list)
    features_s: float = 0.0
    train_s: list[float] = field(default_factory=list)
    eval_s: float = 0.0
    timed: bool = True  # `evaluate` writes no timings

    @classmethod
    def resumed(cls, saved: RunResults) -> RunLog:
        t = saved.timings
        return cls([tuple(x) for x in saved.tasks], None if saved.task_specs is None else [tuple(x) for x in saved.task_specs],
                   saved.method, list(saved.steps), t.features_s if t else 0.0, list(t.train_s_per_task) if t else [],
                   t.eval_s if t else 0.0)

    def add_step(self, step: Step) -> None:
        self.steps.append(step)

    def results(self, skipped: list[tuple[str, str]]) -> RunResults:
        timings = Timings(self.features_s, tuple(self.train_s), self.eval_s) if self.timed else None
        return RunResults(
            tasks=tuple(self.tasks), steps=tuple(self.steps), method=self.method,
            task_specs=None if self.task_specs is None else tuple(self.task_specs), timings=timings,
            final=summarize(self.steps), skipped_files=tuple(SkippedFile(p, r) for p, r in skipped),
        )


def evaluate_seen(
    system: System, test_sets: dict[int, FeatureSet | None], names: dict[int, list[str]], single_model_task: int | None = None
) -> tuple[tuple[TaskEval, ...], dict[int, Scores]]:
    """Evaluate every scenario task in `test_sets` (routing on, and oracle); `names` are their classes."""
    per_task, scores = [], {}
    scorer = system.scorer
    thresholds = {r.index: r.threshold for r in system.tasks}
    for t, fs in sorted(test_sets.items()):
        if fs is None:
            per_task.append(TaskEval(t, tuple(names[t]), skipped="test data not available"))
            continue
        res, scores[t] = evaluate_task(scorer, fs, t, names[t], single_model_task, thresholds)
        per_task.append(res)
    return tuple(per_task), scores


def _write(run: RunDir, log: RunLog, cfg: Config, system: System) -> RunResults:
    results = log.results(system.skipped)
    run.save_results(results)
    run.save_config(cfg)
    return results


def _plot(run: RunDir, system: System, results: RunResults, test_sets: dict, scores: dict, names: dict[int, list[str]]) -> None:
    """PNG figures and report.html of the run (config `output.plots`)."""
    if not system.cfg.output.plots:
        return
    from moleflow.results.html import write_report_html
    from moleflow.results.plots import TaskView, write_run_plots

    views = []
    for t, sc in sorted(scores.items()):
        fs = test_sets[t]
        record = system.tasks[min(t, len(system.tasks) - 1)]  # baselines have one model task
        with system.model.use_task(record.index):
            weight = blend_weight(system.model, system.cfg.scoring) if system.cfg.scoring.patch_score == "blend" else None
        views.append(TaskView(
            task=t,
            name="+".join(names[t]),
            labels=fs.labels.numpy(),
            scores=sc.image.numpy(),
            threshold=record.threshold,
            paths=list(fs.paths),
            maps=sc.maps.numpy(),
            masks=None if fs.masks is None else fs.masks[:, 0].numpy().astype(bool),
            routed=sc.tasks.numpy(),
            score_label=patch_score_label(system.cfg.scoring, weight),
        ))
    write_run_plots(run.path, results, views, system.cfg.data.image_size, system.cfg.output.panels_per_task)
    write_report_html(run.path, results)


def _resume_state(cfg: Config, run: RunDir, tasks: list[list[str]], echo) -> tuple[System, RunLog] | None:
    """The saved system and results of an interrupted `fit`, or None when nothing was completed."""
    if not (run.model / checkpoint.MANIFEST).is_file():
        return None
    if not METHODS[cfg.method].resumable:
        raise ConfigError(f"--resume continues method: moleflow runs; {run.path} is a '{cfg.method}' run, start it again")
    _check_same_config(cfg, saved_config(run.model), run.path)
    system = load_system(run.model)
    done = len(system.tasks)
    if [r.specs for r in system.tasks] != tasks[:done]:
        raise ConfigError(f"--resume: the tasks saved in {run.model} are not the start of this scenario")
    previous = run.read_results()
    log = _new_log(cfg.method, tasks)
    if previous is not None:
        log = RunLog.resumed(previous)
        log.steps = [s for s in log.steps if s.after_task < done]
        log.train_s = log.train_s[:done]
    echo(f"resuming {run.path}: {done} of {len(tasks)} tasks completed")
    return system, log


def _check_same_config(cfg: Config, saved: dict, path: Path) -> None:
    mine = config_to_dict(cfg)
    diff = [k for k in mine if k != "output" and mine[k] != saved.get(k)]
    if diff:
        raise ConfigError(f"--resume: {path} was started with another config (sections {', '.join(diff)} differ); resume with the same config or use a new --out")


def _new_log(method: str, tasks: list[list[str]]) -> RunLog:
    return RunLog([tuple(display_name(s) for s in specs) for specs in tasks], [tuple(t) for t in tasks], method)


def run_fit(cfg: Config, run_dir: Path, progress: bool = True, echo=print, resume: bool = False) -> RunResults:
    """Train the configured scenario task by task with `cfg.method` (methods.py), evaluating every seen
    task after each one. The model is saved after every task, so `resume=True` continues an interrupted
    run from the last completed task; every task is seeded on its own (system.py), so the results equal
    an uninterrupted run's.
    """
    run = RunDir(Path(run_dir)).create()
    method = METHODS[cfg.method]
    tasks = resolve_tasks(cfg)
    names = {t: [display_name(s) for s in specs] for t, specs in enumerate(tasks)}
    state = _resume_state(cfg, run, tasks, echo) if resume else None
    if state is None:
        run.save_config(cfg)
        seed_everything(cfg.train.seed)  # the shared flow's initialisation
        system, log = build_system(cfg), _new_log(cfg.method, tasks)
    else:
        system, log = state
    done = len(system.tasks)
    test_sets: dict[int, FeatureSet | None] = {}
    trains: dict[int, FeatureSet] = {}
    scores: dict = {}
    for t, specs in enumerate(tasks):
        t0 = time.perf_counter()
        if t < done:  # completed before the interruption: only its test set is needed again
            test_sets[t] = task_features(system, specs, "test", progress)
            log.features_s += time.perf_counter() - t0
            if t == done - 1 and len(log.steps) < done:  # killed after saving, before evaluating
                per_task, scores = evaluate_seen(system, test_sets, names, method.scoring_task)
                log.add_step(Step(t, per_task, TrainLog()))
                _write(run, log, cfg, system)
            continue
        trains[t] = task_features(system, specs, "train", progress)
        test_sets[t] = task_features(system, specs, "test", progress)
        log.features_s += time.perf_counter() - t0
        train_log = method.learn(system, t, tasks, trains, progress)
        if train_log is None:
            continue
        log.train_s.append(train_log.seconds)
        t0 = time.perf_counter()
        per_task, scores = evaluate_seen(system, test_sets, names, method.scoring_task)
        log.eval_s += time.perf_counter() - t0
        log.add_step(Step(t, per_task, train_log))
        if cfg.output.save_model:
            save_system(system, run.model, new_tasks=[len(system.tasks) - 1])
        echo(step_line(_write(run, log, cfg, system).steps[-1]))
    if not scores:  # a resumed run that had already finished: score once more for the figures
        _, scores = evaluate_seen(system, test_sets, names, method.scoring_task)
    results = log.results(system.skipped)
    _plot(run, system, results, test_sets, scores, names)
    return results


def run_add_task(model_dir: Path, tasks: list[list[str]], roots: dict[str, str], run_dir: Path | None, progress: bool = True,
                 echo=print, ray: str | None = None) -> RunResults:
    """Learn new tasks (each a list of class specs) on a saved model from the new images only: one after
    another, or with `ray` (a cluster address, parallel.py) side by side. Then evaluate as the steps of
    a sequential run: after each new task, every task known by then, routed."""
    model_dir = Path(model_dir)
    if ray is not None:
        ray_module()
    system = load_system(model_dir)
    if not METHODS[system.cfg.method].extendable:
        raise ConfigError(f"{model_dir} is a '{system.cfg.method}' baseline; add-task needs a model trained with method: moleflow")
    system.cfg = dataclasses.replace(system.cfg, data=dataclasses.replace(system.cfg.data, roots={**system.cfg.data.roots, **roots}))
    _check_new_classes(system, tasks, model_dir)
    run = RunDir(Path(run_dir) if run_dir else model_dir.parent).create()
    previous = run.read_results()
    log = RunLog.resumed(previous) if previous is not None else RunLog(
        [tuple(r.classes) for r in system.tasks], [tuple(r.specs) for r in system.tasks])
    first = len(system.tasks)
    jobs = {first + i: list(specs) for i, specs in enumerate(tasks)}
    if ray is None:
        logs = {}
        for t, specs in jobs.items():
            t0 = time.perf_counter()
            train = task_features(system, specs, "train", progress)
            log.features_s += time.perf_counter() - t0
            logs[t] = learn_new_task(system, specs, train, progress, step=t)[1]
            save_system(system, model_dir, new_tasks=[t])
    else:
        logs = learn_tasks(system, model_dir, jobs, ray, echo, base_shared=checkpoint.read_manifest(model_dir)["shared"])
        save_system(system, model_dir, new_tasks=[])  # the manifest switches once, with every new task
    test_sets = _earlier_test_sets(system, first, progress, echo)
    t0 = time.perf_counter()
    test_sets.update({t: task_features(system, specs, "test", progress) for t, specs in jobs.items()})
    log.features_s += time.perf_counter() - t0
    log.tasks += [tuple(display_name(s) for s in specs) for specs in jobs.values()]
    log.task_specs = [*(log.task_specs or []), *(tuple(specs) for specs in jobs.values())]
    names = {r.index: r.classes for r in system.tasks}
    del log.steps[first:]
    scores = _evaluate_steps(system, test_sets, names, logs, log, first, echo)
    results = _write(run, log, system.cfg, system)
    checkpoint.clear_pending(model_dir)
    _plot(run, system, results, test_sets, scores, names)
    return results


def _check_new_classes(system: System, tasks: list[list[str]], model_dir: Path) -> None:
    known = {c for r in system.tasks for c in r.specs} | {c for r in system.tasks for c in r.classes}
    for s in [s for specs in tasks for s in specs]:
        if s in known or display_name(s) in known:
            raise ConfigError(f"class '{s}' is already a task of {model_dir}, or twice among the new ones; add-task takes "
                              "classes the model has not learned")
        known |= {s, display_name(s)}


def _evaluate_steps(system: System, test_sets: dict[int, FeatureSet | None], names: dict[int, list[str]],
                    logs: dict[int, TrainLog], log: RunLog, first: int, echo) -> dict[int, Scores]:
    """The steps after tasks first, first+1, … as a sequential run evaluates them: every task learned by
    then, routed among those tasks only (`first_tasks`), with the task's training log."""
    scores: dict[int, Scores] = {}
    t0 = time.perf_counter()
    del log.train_s[first:]
    for k in range(first, len(system.tasks)):
        seen = {t: fs for t, fs in test_sets.items() if t <= k}
        per_task, scores = evaluate_seen(first_tasks(system, k), seen, {t: names[t] for t in seen})
        train_log = logs.get(k, TrainLog())
        log.train_s.append(train_log.seconds)
        log.add_step(Step(k, per_task, train_log))
        echo(step_line(log.steps[-1]))
    log.eval_s += time.perf_counter() - t0
    return scores


def _earlier_test_sets(system: System, first: int, progress: bool, echo) -> dict[int, FeatureSet | None]:
    """Test features of the tasks before task `first`; a task whose test data is gone is noted and skipped."""
    test_sets: dict[int, FeatureSet | None] = {}
    for rec in system.tasks[:first]:
        try:
            test_sets[rec.index] = task_features(system, list(rec.specs), "test", progress)
        except (ConfigError, ValueError, FileNotFoundError) as exc:
            echo(f"note: task {rec.index} ({'+'.join(rec.classes)}) not evaluated: {exc}")
            test_sets[rec.index] = None
    return test_sets


def run_fit_parallel(cfg: Config, run_dir: Path, address: str, progress: bool = True, echo=print, resume: bool = False) -> RunResults:
    """`run_fit` with every task after the first learned as its own Ray task (parallel.py): the same task
    files and results. The manifest switches once, after the last task; `resume=True` keeps the tasks an
    interrupted run wrote."""
    if cfg.method != "moleflow":
        raise ConfigError(f"--ray learns the tasks of method: moleflow side by side; '{cfg.method}' trains one model step after step")
    ray_module()
    run = RunDir(Path(run_dir)).create()
    tasks = resolve_tasks(cfg)
    state = _resume_state(cfg, run, tasks, echo) if resume else None
    if state is None:
        if (run.model / checkpoint.MANIFEST).is_file():
            raise ConfigError(f"{run.path} holds a model already; continue it with --resume or use a new --out")
        if resume and checkpoint.read_pending(run.model) is not None:
            _check_same_config(cfg, run.read_config(), run.path)
        else:
            checkpoint.clear_pending(run.model)
        run.save_config(cfg)
        seed_everything(cfg.train.seed)  # as run_fit (a worker builds the shared flow the same way)
        system, log = build_system(cfg), _new_log(cfg.method, tasks)
    else:
        system, log = state
    jobs = {t: specs for t, specs in enumerate(tasks) if t >= len(system.tasks)}
    logs = learn_tasks(system, run.model, jobs, address, echo)
    save_system(system, run.model, new_tasks=[])  # the manifest switches once, with every task
    t0 = time.perf_counter()
    test_sets: dict[int, FeatureSet | None] = {t: task_features(system, specs, "test", progress) for t, specs in enumerate(tasks)}
    log.features_s += time.perf_counter() - t0
    names = {t: [display_name(s) for s in specs] for t, specs in enumerate(tasks)}
    scores = _evaluate_steps(system, test_sets, names, logs, log, len(log.steps), echo)
    results = _write(run, log, cfg, system)
    checkpoint.clear_pending(run.model)
    _plot(run, system, results, test_sets, scores, names)
    return results


def run_evaluate(model_dir: Path, cfg: Config | None, run_dir: Path, progress: bool = True, echo=print) -> RunResults:
    """Evaluate a saved model on the test sets of its tasks (data locations from `cfg` when given)."""
    system = load_system(model_dir)
    if cfg is not None:  # where the test data lies; the model's own settings stay
        system.cfg = dataclasses.replace(system.cfg, data=cfg.data)
    test_sets = {r.index: task_features(system, list(r.specs), "test", progress) for r in system.tasks}
    names = {r.index: r.classes for r in system.tasks}
    per_task, scores = evaluate_seen(system, test_sets, names, METHODS[system.cfg.method].scoring_task)
    log = RunLog([tuple(r.classes) for r in system.tasks], None, timed=False)
    log.add_step(Step(len(system.tasks) - 1, per_task))
    run = RunDir(Path(run_dir)).create()
    results = _write(run, log, system.cfg, system)
    echo(step_line(results.steps[-1]))
    _plot(run, system, results, test_sets, scores, names)
    return results
