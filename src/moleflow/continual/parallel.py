"""Learning tasks in parallel on a Ray cluster (`fit --ray`, `add-task --ray`).

Complete separation makes every task after the first independent of the others: it trains only its
own modules (LoRA experts, task biases, whitening, DIA) over the frozen shared flow. So task 0, when
it is new, trains first; then every further task trains as its own Ray task (one CPU slot, or one GPU
where the cluster has them), reads its images from a path the cluster can see, and returns its
tensors, router prototype, threshold and training log. The driver writes each task file as it
arrives, notes it in a journal (`model/pending.json`), and switches the manifest once at the end
(atomically); a run killed midway keeps every journaled task, and `--resume` trains only the rest.

Same result as the sequential run: a worker builds the model and seeds task k exactly as `run_fit` and
`learn_new_task` do (see system.py) and computes on one thread, so with `OMP_NUM_THREADS=1` for the
sequential `fit` every task file is byte-identical, and so is every evaluation.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from threadpoolctl import threadpool_limits

from moleflow.atomic import atomic_write_text
from moleflow.config import Config, ConfigError, config_from_dict, config_to_dict
from moleflow.continual.system import System, attach_task, build_system, learn_new_task, task_features, task_file_tensors
from moleflow.continual.train import seed_everything
from moleflow.model import checkpoint
from moleflow.model.checkpoint import TaskRecord
from moleflow.results.schema import TrainLog

INSTALL_HINT = "--ray needs Ray, an optional extra: pip install 'moleflow[ray]'"


@dataclass
class LearnedTask:
    """What a worker hands back for one task."""

    record: TaskRecord
    log: TrainLog
    tensors: dict[str, torch.Tensor]  # the task file's content: the task's modules + its router prototype
    shared: dict[str, torch.Tensor] | None  # task 0 only: the shared flow it trained
    skipped: list[tuple[str, str]]  # images left out by data.skip_bad


def ray_module() -> Any:
    """The `ray` module, or a ConfigError that says how to install it (checked before a job writes anything)."""
    try:
        import ray
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray


def connect(address: str) -> Any:
    """The `ray` module, connected: `local` starts a cluster on this machine (every core a slot), `auto`
    joins the cluster this machine belongs to, anything else is a cluster address (host:6379 or
    ray://host:10001)."""
    ray = ray_module()
    if not ray.is_initialized():
        options = {"include_dashboard": False, "logging_level": "warning", "configure_logging": True}
        try:
            ray.init(**options) if address == "local" else ray.init(address=address, **options)
        except ConnectionError as exc:
            raise ConfigError(f"--ray {address}: no Ray cluster reachable there ({exc}); start one with `ray start --head` "
                              "or use --ray local") from None
    return ray


def _cluster_paths(cfg: Config) -> Config:
    """`cfg` with relative data, weights and cache paths made absolute (a worker's working directory
    is not the driver's; on a cluster these paths must exist on every node)."""
    def absolute(p: str) -> str:
        return str(Path(p).resolve()) if p else p

    data = dataclasses.replace(cfg.data, root=absolute(cfg.data.root), roots={k: absolute(v) for k, v in cfg.data.roots.items()})
    weights = cfg.backbone.weights if cfg.backbone.weights in ("auto", "none") else absolute(cfg.backbone.weights)
    backbone = dataclasses.replace(cfg.backbone, weights=weights, cache_dir=absolute(cfg.backbone.cache_dir))
    return dataclasses.replace(cfg, data=data, backbone=backbone)


def learn_task(cfg_tree: dict, shared: dict[str, torch.Tensor] | None, index: int, specs: list[str]) -> LearnedTask:
    """Learn task `index` from its training images (runs in a Ray worker, one thread): the model is
    built as `run_fit` builds it, the shared flow loaded from `shared` (None: this is task 0, which
    trains it)."""
    torch.set_num_threads(1)
    _fault_gate(index)
    with threadpool_limits(1):  # NumPy's BLAS too (the router's covariance): one thread, whatever the node has
        return _learn_task(config_from_dict(cfg_tree), shared, index, specs)


FAULT_GATE = "MOLEFLOW_FAULT_GATE"  # a folder; tests only: lets a test decide when a worker dies


def _fault_gate(index: int) -> None:
    """Tests only: while $MOLEFLOW_FAULT_GATE/hold (any later task) or .../hold-<index> exists, the worker
    of a later task says it is waiting (a file named by its pid, holding the index) and waits, so a test
    kills a worker or the driver at a moment it chose instead of racing it."""
    gate = os.environ.get(FAULT_GATE)
    if not gate or index == 0:
        return
    holds = [Path(gate) / "hold", Path(gate) / f"hold-{index}"]
    if any(h.exists() for h in holds):
        atomic_write_text(Path(gate) / f"worker-{os.getpid()}", str(index))
        while any(h.exists() for h in holds):
            time.sleep(0.05)


def _learn_task(cfg: Config, shared: dict[str, torch.Tensor] | None, index: int, specs: list[str]) -> LearnedTask:
    seed_everything(cfg.train.seed)  # as run_fit: the shared flow's initialisation
    system = build_system(cfg)
    if shared is not None:
        system.model.load_shared_state_dict(shared)
    train = task_features(system, specs, "train", progress=False)
    t, log = learn_new_task(system, specs, train, progress=False, step=index, index=index)
    trained_shared = None if shared is not None else _on_cpu(system.model.shared_state_dict())
    return LearnedTask(system.tasks[-1], log, _on_cpu(task_file_tensors(system, t)), trained_shared, list(system.skipped))


def _on_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors as they cross Ray's object store: detached, on the CPU (a GPU worker's too)."""
    return {k: v.detach().cpu() for k, v in tensors.items()}


def _journal_entry(rec: TaskRecord, log: TrainLog, skipped: list[tuple[str, str]]) -> dict:
    return {**rec.to_entry(), "train": log.to_json(), "skipped": [list(s) for s in skipped]}


def journaled_tasks(model_dir: Path, wanted: dict[int, list[str]]) -> tuple[dict | None, dict[int, LearnedTask]]:
    """What an interrupted parallel run wrote: (its shared-flow entry or None, the tasks among `wanted`
    (index → specs) whose file is intact). Tasks written for other specs are left to train again."""
    journal = checkpoint.read_pending(model_dir)
    if journal is None:
        return None, {}
    kept = {}
    for e in journal.get("tasks", []):
        if wanted.get(e["index"]) != e["specs"]:
            continue
        tensors = checkpoint.read_checked(model_dir, e)
        kept[e["index"]] = LearnedTask(TaskRecord.from_entry(e), TrainLog.from_json(e["train"]), tensors, None, [tuple(s) for s in e["skipped"]])
    return journal.get("shared"), kept


class _Journal:
    """The driver's record of the files it wrote ahead of the manifest."""

    def __init__(self, model_dir: Path, shared: dict | None, kept: dict[int, LearnedTask]) -> None:
        self.model_dir = model_dir
        self.shared = shared
        self.tasks = {t: _journal_entry(lt.record, lt.log, lt.skipped) for t, lt in kept.items()}

    def add(self, lt: LearnedTask) -> None:
        if lt.shared is not None:
            self.shared = checkpoint.write_shared_file(self.model_dir, lt.shared)
        checkpoint.write_task_file(self.model_dir, lt.record, lt.tensors)
        self.tasks[lt.record.index] = _journal_entry(lt.record, lt.log, lt.skipped)
        checkpoint.write_pending(self.model_dir, {"shared": self.shared, "tasks": [self.tasks[t] for t in sorted(self.tasks)]})


def _remote(ray: Any, cfg: Config) -> Any:
    """`learn_task` as a Ray task: one CPU slot, or one GPU when the cluster has them and the config
    allows CUDA; a worker that dies is started again (max_retries)."""
    gpus = 1 if cfg.train.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return ray.remote(num_cpus=1, num_gpus=gpus, max_retries=3)(learn_task)


def learn_tasks(system: System, model_dir: Path, jobs: dict[int, list[str]], address: str, echo=print,
                base_shared: dict | None = None) -> dict[int, TrainLog]:
    """Learn the tasks `jobs` (index → class specs) on Ray and attach them to `system`, whose shared flow
    is trained (its manifest entry `base_shared`), or which is new: then task 0 is among the jobs and
    trains first. Task files and the journal are written as tasks arrive; the caller switches the
    manifest. Returns each task's training log. Tasks an interrupted run journaled over the same shared
    flow, with the same index and specs, are kept, not trained again."""
    shared_entry, kept = journaled_tasks(model_dir, jobs)
    if base_shared is not None and shared_entry is not None and shared_entry["sha256"] != base_shared["sha256"]:
        shared_entry, kept = None, {}  # journaled over another model's shared flow: train everything
    if 0 in jobs and 0 not in kept:
        shared_entry, kept = None, {}  # a new model whose task 0 was not kept: the others need its shared flow
    journal = _Journal(model_dir, shared_entry or base_shared, kept)
    if shared_entry is not None and base_shared is None:  # task 0 of this new model trained before the interruption
        system.model.load_shared_state_dict(checkpoint.read_checked(model_dir, shared_entry))
    for t, lt in sorted(kept.items()):
        _attach(system, lt)
        echo(f"task {t} ({'+'.join(lt.record.classes)}): kept from the interrupted run")
    todo = {t: specs for t, specs in sorted(jobs.items()) if t not in kept}
    if todo:
        _learn_on_ray(system, journal, todo, address, echo)
    system.tasks.sort(key=lambda r: r.index)
    return {t: TrainLog.from_json(journal.tasks[t]["train"]) for t in jobs}


def _learn_on_ray(system: System, journal: _Journal, todo: dict[int, list[str]], address: str, echo) -> None:
    ray = connect(address)
    remote = _remote(ray, system.cfg)
    cfg_tree = config_to_dict(_cluster_paths(system.cfg))
    if 0 in todo:  # the shared flow first: every other task trains over it
        _arrived(system, journal, _get(ray, remote.remote(cfg_tree, None, 0, todo.pop(0))), echo)
    shared_ref = ray.put(_on_cpu(system.model.shared_state_dict()))
    pending = {remote.remote(cfg_tree, shared_ref, t, specs): t for t, specs in todo.items()}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            pending.pop(done[0])
            _arrived(system, journal, _get(ray, done[0]), echo)
    except BaseException:  # a task failed or the run was interrupted: stop the others
        _abandon(ray, list(pending))
        raise


def _abandon(ray: Any, refs: list) -> None:
    """Cancel the tasks still running; their outcome is fetched and dropped, so that Ray does not print
    it as an unhandled error after the run's own one-line message."""
    for ref in refs:
        ray.cancel(ref, force=True)
    for ref in refs:
        try:
            ray.get(ref, timeout=60)
        except Exception:  # noqa: BLE001  (cancelled, or failed like the first: the first's error is the one shown)
            pass


def _get(ray: Any, ref: Any) -> LearnedTask:
    """A worker's result; a user error raised in the worker (a missing folder, a NaN loss) is raised
    here as itself, so the command line reports it in one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        raise exc.cause from None


def _attach(system: System, lt: LearnedTask) -> None:
    """A learned task into the driver's system: its modules, prototype and record, its skipped files."""
    attach_task(system, lt.record, lt.tensors)
    system.skipped += [s for s in lt.skipped if s not in system.skipped]


def _arrived(system: System, journal: _Journal, lt: LearnedTask, echo) -> None:
    journal.add(lt)
    if lt.shared is not None:
        system.model.load_shared_state_dict(lt.shared)
    _attach(system, lt)
    echo(f"task {lt.record.index} ({'+'.join(lt.record.classes)}): learned in {lt.log.seconds:.1f} s")
