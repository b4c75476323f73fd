"""The jobs behind the command line: fit a scenario, add a task to a saved model, evaluate, predict.

Each job reads images through `data/`, features through `features.py` (once per image), and writes a
run directory: the resolved `config.yaml`, `results.json`, `results.md`, plots and the model in `model/`.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moleflow.model import checkpoint
from moleflow.features.backbone import FeatureExtractor, resolve_device
from moleflow.model.checkpoint import CheckpointError, TaskRecord
from moleflow.config import Config, ConfigError, config_from_dict, config_to_dict, save_config
from moleflow.data import build_dataset, parse_class_spec
from moleflow.continual.evaluate import Scores, evaluate_task, score_features
from moleflow.results.summary import summarize
from moleflow.features.cache import FeatureSet, extract_features
from moleflow.model.mole_flow import MoLEFlow
from moleflow.continual.ogp import GradientMemory, task_gradients
from moleflow.router import Prototype, TaskRouter
from moleflow.continual.scenario import display_name, resolve_tasks
from moleflow.continual.train import fit_task, seed_everything


@dataclass
class System:
    """A backbone, the flow with its task modules, the router, and what each task is."""

    cfg: Config
    device: torch.device
    extractor: FeatureExtractor
    model: MoLEFlow
    router: TaskRouter
    tasks: list[TaskRecord] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) left out by data.skip_bad
    memory: GradientMemory | None = None  # earlier tasks' gradient subspaces (finetune with train.ogp)

    def record(self, t: int) -> TaskRecord:
        return self.tasks[t]


def build_system(cfg: Config) -> System:
    device = resolve_device(cfg.train.device)
    extractor = FeatureExtractor(cfg.backbone, cfg.data.image_size, device)
    model = MoLEFlow(cfg.model, extractor.out_channels).to(device)
    router = TaskRouter(cfg.router.mode, cfg.router.hybrid_top_k, cfg.router.unknown, cfg.router.unknown_quantile,
                        cfg.router.calibrated, cfg.router.descriptor, cfg.router.shrinkage, cfg.router.likelihood)
    memory = GradientMemory(cfg.train.ogp_threshold, cfg.train.ogp_max_rank) if cfg.train.ogp else None
    return System(cfg, device, extractor, model, router, memory=memory)


def task_features(system: System, specs: list[str], split: str, progress: bool) -> FeatureSet:
    """Features of the union of a task's classes (class names shown without a dataset prefix)."""
    sets = []
    for spec in specs:
        ds = build_dataset(system.cfg.data, spec, split)
        system.skipped += [(str(p), r) for p, r in ds.skipped if (str(p), r) not in system.skipped]
        fs = extract_features(
            system.extractor,
            ds,
            batch_size=system.cfg.backbone.batch_size,
            cache_dir=system.cfg.backbone.cache_dir or None,
            progress=progress,
            desc=f"features {display_name(spec)}/{split}",
        )
        fs.class_names = [display_name(spec)] * len(fs)
        sets.append(fs)
    return sets[0] if len(sets) == 1 else FeatureSet.concat(sets)


def calibrate_threshold(system: System, task: int, train: FeatureSet) -> tuple[float, float]:
    """The decision threshold (a high quantile of the task's training-image scores) and the bottom of
    its map colour scale (1st percentile of training patch scores)."""
    s = score_features(system.model, train, torch.full((len(train),), task), system.cfg, system.device, with_maps=False)
    threshold = float(np.quantile(s.image.numpy(), system.cfg.scoring.threshold_quantile))
    return threshold, float(np.quantile(s.patch.numpy(), 0.01))


def learn_task(system: System, specs: list[str], train: FeatureSet, progress: bool, retrain: int | None = None) -> tuple[int, dict]:
    """Add one task to the model and router, train it, calibrate its threshold.

    `retrain=t` trains the existing model task t again instead (the `finetune` baseline, whose single
    set of modules, shared weights included, learns every scenario task in turn).
    """
    t = len(system.tasks) if retrain is None else retrain
    seed_everything(system.cfg.train.seed + (len(system.tasks) if retrain is None else 1000 + len(specs)))
    if retrain is None:
        system.model.add_task(t)
        system.router.add_task(t, train.descriptors)
    try:
        log = fit_task(system.model, t, train, system.cfg.train, system.cfg.loss, system.device, progress=progress,
                       memory=system.memory)
    except BaseException:
        if retrain is None:
            system.model.remove_task(t)
            system.router.prototypes.pop(t, None)
        raise
    if system.memory is not None:
        remember_gradients(system, t, train)
    threshold, map_low = calibrate_threshold(system, t, train)
    record = TaskRecord(t, [display_name(s) for s in specs], threshold, list(specs), map_low)
    if retrain is None:
        system.tasks.append(record)
    else:
        system.tasks[t] = record
    info = {"epoch_loss": log.epoch_loss, "seconds": log.seconds, "steps": log.steps, "n_train": len(train)}
    if system.memory is not None:
        info["ogp_directions"] = sum(system.memory.rank().values())  # stored so far, over all tensors
    if log.grad_norms:
        info["grad_norms"] = log.grad_norms  # per epoch, per coupling block (train.record_grad_norms)
    return t, info


def remember_gradients(system: System, t: int, train: FeatureSet) -> None:
    """Add the gradient subspace of the task just learned (in model task t's weights) to the OGP memory."""
    cfg = system.cfg.train
    system.model.set_trainable(t)
    try:
        grads = task_gradients(system.model, t, train, system.cfg.loss, system.device, cfg.batch_size, cfg.ogp_batches)
    finally:
        for p in system.model.parameters():
            p.requires_grad_(False)
    system.memory.add(grads)


def evaluate_seen(
    system: System, test_sets: dict[int, FeatureSet | None], names: dict[int, list[str]], single_model_task: int | None = None
) -> tuple[list[dict], dict[int, Scores]]:
    """Evaluate every scenario task in `test_sets` (routing on, and oracle); `names` are their classes."""
    per_task, scores = [], {}
    for t, fs in sorted(test_sets.items()):
        if fs is None:
            per_task.append({"task": t, "classes": names[t], "skipped": "test data not available"})
            continue
        res, sc = evaluate_task(system.model, system.router, fs, t, system.cfg, system.device, single_model_task)
        res["classes"] = names[t]
        per_task.append(res)
        scores[t] = sc
    return per_task, scores


def save_system(system: System, model_dir: Path, new_tasks: list[int] | None = None) -> dict:
    """Write the model; only `new_tasks` (default: all) get their task files (re)written."""
    new = range(len(system.tasks)) if new_tasks is None else new_tasks
    task_tensors = {}
    for t in new:
        tensors = dict(system.model.task_state_dict(t))
        tensors.update(system.router.prototypes[t].to_tensors())
        task_tensors[t] = tensors
    return checkpoint.write_model(
        model_dir,
        config=config_to_dict(system.cfg),
        backbone=system.extractor.identity(),
        channels=system.extractor.out_channels,
        grid=system.extractor.grid,
        shared=system.model.shared_state_dict(),
        tasks=[TaskRecord(r.index, r.classes, r.threshold, r.specs, r.map_low) for r in system.tasks],
        task_tensors=task_tensors,
    )


def load_system(model_dir: Path, cfg_overrides: Config | None = None) -> System:
    """Rebuild a saved system; the backbone and dimensions must match what the model was trained on."""
    model_dir = Path(model_dir)
    manifest = checkpoint.read_manifest(model_dir)
    try:
        cfg = cfg_overrides or config_from_dict(manifest["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{model_dir / checkpoint.MANIFEST}: its config is invalid: {exc}") from None
    system = build_system(cfg)
    ident = system.extractor.identity()
    if ident != manifest["backbone"]:
        diff = sorted(k for k in set(ident) | set(manifest["backbone"]) if ident.get(k) != manifest["backbone"].get(k))
        raise CheckpointError(
            f"{model_dir}: the backbone differs from the one the model was trained with ({', '.join(diff)}); "
            "use the model's own backbone settings"
        )
    if system.extractor.out_channels != manifest["channels"] or list(system.extractor.grid) != manifest["grid"]:
        raise CheckpointError(f"{model_dir}: feature dimensions differ from the model's ({manifest['channels']} channels, grid {manifest['grid']})")
    system.model.load_shared_state_dict(checkpoint.read_checked(model_dir, manifest["shared"]))
    for entry in manifest["tasks"]:
        tensors = checkpoint.read_checked(model_dir, entry)
        router_part = {k: v for k, v in tensors.items() if k.startswith("router.")}
        model_part = {k: v for k, v in tensors.items() if not k.startswith("router.")}
        system.model.load_task_state_dict(entry["index"], model_part)
        system.router.set_prototype(entry["index"], Prototype.from_tensors(router_part))
        system.tasks.append(
            TaskRecord(entry["index"], entry["classes"], entry["threshold"], entry["specs"], entry["map_low"], entry["file"], entry["sha256"])
        )
    system.model.to(system.device).eval()
    return system


def write_results(run_dir: Path, results: dict, cfg: Config, skipped: list[tuple[str, str]] | None = None) -> None:
    from moleflow.results.tables import results_markdown

    if skipped:
        results["skipped_files"] = [{"path": p, "reason": r} for p, r in skipped]

    checkpoint.atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
    checkpoint.atomic_write_text(run_dir / "results.md", results_markdown(results))
    save_config(cfg, run_dir / "config.yaml")


def _plot(run_dir: Path, system: System, results: dict, test_sets: dict, scores: dict, names: dict[int, list[str]], progress: bool) -> None:
    """PNG figures and report.html of the run (config `output.plots`)."""
    if not system.cfg.output.plots:
        return
    from moleflow.results.html import write_report_html
    from moleflow.results.plots import TaskView, write_run_plots

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
    write_run_plots(run_dir, results, views, system.cfg.data.image_size, system.cfg.output.panels_per_task)
    write_report_html(run_dir, results)


def _resume_state(cfg: Config, run_dir: Path) -> tuple[System, dict] | None:
    """The saved system and results of an interrupted `fit`, or None when nothing was completed."""
    model_dir = run_dir / "model"
    if not (model_dir / checkpoint.MANIFEST).is_file():
        return None
    if cfg.method != "moleflow":
        raise ConfigError(f"--resume continues method: moleflow runs; {run_dir} is a '{cfg.method}' run, start it again")
    saved = checkpoint.read_manifest(model_dir)["config"]
    mine = config_to_dict(cfg)
    diff = [k for k in mine if k != "output" and mine[k] != saved.get(k)]
    if diff:
        raise ConfigError(f"--resume: {run_dir} was started with another config (sections {', '.join(diff)} differ); resume with the same config or use a new --out")
    system = load_system(model_dir)
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"steps": []}
    return system, results


def run_fit(cfg: Config, run_dir: Path, progress: bool = True, echo=print, resume: bool = False) -> dict:
    """Train the configured scenario task by task, evaluating every seen task after each one.

    `method: moleflow` adds per-task modules for each task (old tasks never change); `finetune` trains
    one set of modules, shared weights included, on each task in turn (it forgets); `joint` trains one
    set on all tasks' images at once (the non-continual upper bound). Baselines have no router.
    The model is saved after every task, so `resume=True` continues an interrupted run from the last
    completed task; every task is seeded on its own, so the results equal an uninterrupted run's.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
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
    single = None if cfg.method == "moleflow" else 0
    test_sets: dict[int, FeatureSet | None] = {}
    trains: list[FeatureSet] = []
    scores: dict = {}
    for t, specs in enumerate(tasks):
        t0 = time.perf_counter()
        if t < done:  # completed before the interruption: only its test set is needed again
            test_sets[t] = task_features(system, specs, "test", progress)
            results["timings"]["features_s"] += time.perf_counter() - t0
            if t == done - 1 and len(results["steps"]) < done:  # killed after saving, before evaluating
                per_task, scores = evaluate_seen(system, test_sets, names, single)
                results["steps"].append({"after_task": t, "per_task": per_task, "train": {}})
                results["final"] = summarize(results["steps"])
                write_results(run_dir, results, cfg, system.skipped)
            continue
        trains.append(task_features(system, specs, "train", progress))
        test_sets[t] = task_features(system, specs, "test", progress)
        results["timings"]["features_s"] += time.perf_counter() - t0
        if cfg.method == "joint" and t < len(tasks) - 1:
            continue  # joint learns once, from every task's images
        if cfg.method == "moleflow":
            _, log = learn_task(system, specs, trains[-1], progress)
        elif cfg.method == "finetune":
            _, log = learn_task(system, sum(tasks[: t + 1], []), trains[-1], progress, retrain=0 if t else None)
        else:
            _, log = learn_task(system, sum(tasks, []), FeatureSet.concat(trains), progress)
        results["timings"]["train_s_per_task"].append(log["seconds"])
        t0 = time.perf_counter()
        per_task, scores = evaluate_seen(system, test_sets, names, single)
        results["timings"]["eval_s"] += time.perf_counter() - t0
        results["steps"].append({"after_task": t, "per_task": per_task, "train": log})
        results["final"] = summarize(results["steps"])
        if cfg.output.save_model:
            save_system(system, run_dir / "model", new_tasks=[len(system.tasks) - 1])
        write_results(run_dir, results, cfg, system.skipped)
        echo(step_line(results["steps"][-1]))
    if not scores:  # a resumed run that had already finished: score once more for the figures
        _, scores = evaluate_seen(system, test_sets, names, single)
    _plot(run_dir, system, results, test_sets, scores, names, progress)
    return results


def step_line(step: dict) -> str:
    parts = [f"{'+'.join(e['classes'])}: {e['image_auroc']:.4f}" if e.get("image_auroc") is not None else f"{'+'.join(e['classes'])}: -"
             for e in step["per_task"]]
    routing = [e["routing_accuracy"] for e in step["per_task"] if e.get("routing_accuracy") is not None]
    return f"after task {step['after_task']}: image AUROC " + ", ".join(parts) + (f" | routing {np.mean(routing):.3f}" if routing else "")


def run_add_task(model_dir: Path, specs: list[str], roots: dict[str, str], run_dir: Path | None, progress: bool = True, echo=print) -> dict:
    """Learn one new task on a saved model from the new images only; evaluate every task with routing."""
    model_dir = Path(model_dir)
    system = load_system(model_dir)
    cfg = copy.deepcopy(system.cfg)
    if cfg.method != "moleflow":
        raise ConfigError(f"{model_dir} is a '{cfg.method}' baseline; add-task needs a model trained with method: moleflow")
    cfg.data.roots.update(roots)
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
    t, log = learn_task(system, specs, train, progress)
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
    if cfg is not None:
        system.cfg.data = cfg.data  # where the test data lies; the model's own settings stay
    test_sets = {r.index: task_features(system, list(r.specs), "test", progress) for r in system.tasks}
    names = {r.index: r.classes for r in system.tasks}
    single = None if system.cfg.method == "moleflow" else 0
    per_task, scores = evaluate_seen(system, test_sets, names, single)
    results = {"tasks": [r.classes for r in system.tasks], "steps": [{"after_task": len(system.tasks) - 1, "per_task": per_task}]}
    results["final"] = summarize(results["steps"])
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_results(run_dir, results, system.cfg)
    echo(step_line(results["steps"][-1]))
    _plot(run_dir, system, results, test_sets, scores, names, progress)
    return results
