"""A trained system: backbone, flow with its task modules, router, and what each task is; built, saved, loaded.

`learn_new_task` and `retrain_task` are the two ways a task's modules get trained (the methods in
`methods.py` choose between them); both calibrate the task's decision threshold afterwards.

Seeding, one rule for every job: the model is built right after `seed_everything(train.seed)`, and the
k-th training of a run (k = 0, 1, …: the task index for moleflow, the scenario step for the baselines)
starts from `seed_everything(train.seed + k)`. A resumed run or a later `add-task` thus trains task k
from the same random state as an uninterrupted run.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from moleflow.config import Config, ConfigError, config_from_dict, config_to_dict
from moleflow.continual.blend_weight import choose_memory_weight
from moleflow.continual.ogp import GradientMemory, task_gradients
from moleflow.continual.scenario import display_name
from moleflow.continual.train import TrainLog as FitLog, fit_task, seed_everything
from moleflow.data import build_dataset
from moleflow.features.backbone import FeatureExtractor, resolve_device
from moleflow.features.cache import FeatureSet, extract_features
from moleflow.model import checkpoint
from moleflow.model.checkpoint import CheckpointError, TaskRecord
from moleflow.model.memory import scale_sample
from moleflow.model.mole_flow import MoLEFlow
from moleflow.results.schema import TrainLog
from moleflow.router import Prototype, TaskRouter
from moleflow.scoring import Scorer, reads_flow


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
    shared_sha256: str = ""  # the saved shared flow's digest (an export names the model it came from by it)

    @property
    def scorer(self) -> Scorer:
        return Scorer(self.model, self.router, self.cfg.scoring, self.cfg.data.image_size, self.device, self.extractor)


def build_system(cfg: Config) -> System:
    device = resolve_device(cfg.train.device)
    extractor = FeatureExtractor(cfg.backbone, cfg.data.image_size, device)
    model = MoLEFlow(cfg.model, extractor.out_channels).to(device)
    router = TaskRouter(cfg.router)
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


def held_out_scores(system: System, task: int, images: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
    """(image scores, patch scores) of `images` under model task `task`, routing aside."""
    s = system.scorer.score_features(images, torch.full((len(images),), task), with_maps=False)
    return s.image.numpy(), s.patch.numpy()


def held_out_folds(n: int, share: float, folds: int, seed: int) -> list[torch.Tensor]:
    """Sorted indices of each held-out calibration share among n training images: `folds` disjoint
    seeded random shares of `share` each (fold 0 is `calibration_index`); none when a share rounds to
    no image or to all of them (`folds` × `share` ≤ 1, checked by the config)."""
    n_hold = int(share * n)
    if n_hold < 1 or n_hold >= n:
        return []
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [perm[j * n_hold:(j + 1) * n_hold].sort().values for j in range(folds)]


def calibration_index(n: int, share: float, seed: int) -> torch.Tensor | None:
    """Sorted indices of fold 0 of `held_out_folds` (the router calibrates its unknown answer on these
    images, held out of a throwaway prototype), or None when the share rounds to none."""
    folds = held_out_folds(n, share, 1, seed)
    return folds[0] if folds else None


def _without(train: FeatureSet, held: torch.Tensor) -> FeatureSet:
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[held] = False
    return train.subset(keep.nonzero().squeeze(1))


def calibration_seed(cfg: Config, t: int) -> int:
    """The seed of task t's held-out calibration shares and of its synthetic defects."""
    return cfg.train.seed * 1000 + t


def _fit(system: System, model: MoLEFlow, t: int, train: FeatureSet, progress: bool) -> FitLog:
    """Train model task t's modules on `train`, then fill its patch memory from the same images."""
    log = fit_task(model, t, train, system.cfg.train, system.cfg.loss, system.device, progress=progress,
                   memory=system.memory)
    model.fit_memory(t, train.patches, seed=system.cfg.train.seed)
    return log


def _fold_scores(system: System, t: int, train: FeatureSet, folds: list[torch.Tensor], start: MoLEFlow,
                 step: int, progress: bool, weight: float | None) -> list[np.ndarray]:
    """Image scores of each held-out fold by a throwaway copy of the model, taken before task t trained
    (`start`), whose task t trained like the shipped one on the training images outside that fold and
    scores with the shipped task's memory weight `weight` (None: it chose none)."""
    scores = []
    for held in folds:
        model = copy.deepcopy(start)
        seed_everything(system.cfg.train.seed + step)
        rest = _without(train, held)
        if reads_flow(system.cfg.scoring, weight):
            _fit(system, model, t, rest, progress)
        else:  # the scores read the patch memory alone: its coreset is the whole training, no flow needed
            model.fit_memory(t, rest.patches, seed=system.cfg.train.seed, flow_scale=False)
        if weight is not None:
            model.set_memory_weight(t, weight)
        scores.append(held_out_scores(dataclasses.replace(system, model=model.eval()), t, train.subset(held))[0])
    return scores


def _train(system: System, t: int, specs: list[str], train: FeatureSet, progress: bool, step: int) -> tuple[TaskRecord, TrainLog]:
    """Train model task t on all of `train`, update the OGP memory, and calibrate the threshold on the
    held-out shares, each scored by a fold model that did not see it (see `ScoringConfig.calibration_folds`;
    without any share, on the training images): the record and its log."""
    sc = system.cfg.scoring
    folds = held_out_folds(len(train), sc.calibration_holdout, sc.calibration_folds, calibration_seed(system.cfg, t))
    start = copy.deepcopy(system.model) if folds else None  # the fold models start where task t does
    log = _fit(system, system.model, t, train, progress)  # the shipped task learns from every training image
    weight = None
    if sc.patch_score == "blend" and sc.memory_weight_from == "synthetic":
        weight = choose_memory_weight(system.model, system.extractor, t, train.paths, system.cfg.data.image_size,
                                      sc, seed=calibration_seed(system.cfg, t)).weight
        system.model.set_memory_weight(t, weight)
    if system.memory is not None:
        remember_gradients(system, t, train)
    # The colour floor reads the shipped modules' own patch scores on the images that set the memory's
    # medians; the whole training set is scored only when it sets the threshold.
    patch = held_out_scores(system, t, train.subset(scale_sample(len(train))))[1]
    t0 = time.perf_counter()
    if folds:
        pooled = np.concatenate(_fold_scores(system, t, train, folds, start, step, progress, weight))
    else:  # no share held out: the threshold from the training images in sample
        pooled = held_out_scores(system, t, train)[0]
    info = TrainLog(
        epoch_loss=tuple(log.epoch_loss), seconds=log.seconds, steps=log.steps, n_train=len(train),
        n_calibration=len(pooled) if folds else None, calibration_folds=len(folds) or None,
        calibration_seconds=time.perf_counter() - t0 if folds else None,
        ogp_directions=sum(system.memory.rank().values()) if system.memory is not None else None,  # stored so far
        grad_norms=tuple(log.grad_norms) if log.grad_norms else None,  # per epoch, per coupling block
        memory_weight=weight,
    )
    threshold = float(np.quantile(pooled, sc.threshold_quantile))
    map_low = float(np.quantile(patch, 0.01))  # the bottom of the map colour scale: the shipped modules' own
    # the held-out scores are kept so that `moleflow threshold --false-alarm-rate` can move the operating point
    calibration = [float(v) for v in pooled] if folds else []
    return TaskRecord(t, [display_name(s) for s in specs], threshold, list(specs), map_low, calibration=calibration), info


def learn_new_task(system: System, specs: list[str], train: FeatureSet, progress: bool, step: int,
                   index: int | None = None) -> tuple[int, TrainLog]:
    """Add a task to the model and router and train only its modules (and, for task 0, the shared ones).

    The task gets the next index, or `index` (a parallel worker learns task k without tasks 1…k-1: a
    task's training reads only the shared weights and its own modules, so the result is the same)."""
    t = len(system.tasks) if index is None else index
    seed_everything(system.cfg.train.seed + step)
    system.model.add_task(t)
    held = calibration_index(len(train), system.cfg.scoring.calibration_holdout, calibration_seed(system.cfg, t))
    system.router.add_task(t, train.descriptors, held_out=held)  # the same images calibrate the unknown answer
    try:
        record, info = _train(system, t, specs, train, progress, step)
    except BaseException:
        system.model.remove_task(t)
        system.router.prototypes.pop(t, None)
        raise
    system.tasks.append(record)
    return t, info


def retrain_task(system: System, t: int, specs: list[str], train: FeatureSet, progress: bool, step: int) -> tuple[int, TrainLog]:
    """Train the existing model task t again, shared weights included (the `finetune` baseline)."""
    seed_everything(system.cfg.train.seed + step)
    system.tasks[t], info = _train(system, t, specs, train, progress, step)
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


def task_file_tensors(system: System, t: int) -> dict[str, torch.Tensor]:
    """What task t's file holds: its modules' tensors and its router prototype."""
    return {**system.model.task_state_dict(t), **system.router.prototypes[t].to_tensors()}


def attach_task(system: System, record: TaskRecord, tensors: dict[str, torch.Tensor]) -> None:
    """Add a learned task (its record and its file's tensors) to the system."""
    router_part = {k: v for k, v in tensors.items() if k.startswith("router.")}
    model_part = {k: v for k, v in tensors.items() if not k.startswith("router.")}
    system.model.load_task_state_dict(record.index, model_part)
    system.router.set_prototype(record.index, Prototype.from_tensors(router_part))
    system.tasks.append(record)


def first_tasks(system: System, k: int) -> System:
    """A view of the system as it was after learning task k: tasks 0…k, routed among themselves (later
    tasks' modules stay in the model, unused: complete separation)."""
    router = TaskRouter(system.router.cfg)
    router.prototypes = {t: p for t, p in system.router.prototypes.items() if t <= k}
    return dataclasses.replace(system, router=router, tasks=[r for r in system.tasks if r.index <= k])


def save_system(system: System, model_dir: Path, new_tasks: list[int] | None = None) -> dict:
    """Write the model; only `new_tasks` (default: all) get their task files (re)written."""
    new = range(len(system.tasks)) if new_tasks is None else new_tasks
    task_tensors = {t: task_file_tensors(system, t) for t in new}
    manifest = checkpoint.write_model(
        model_dir,
        config=config_to_dict(system.cfg),
        backbone=system.extractor.identity(),
        channels=system.extractor.out_channels,
        grid=system.extractor.grid,
        shared=system.model.shared_state_dict(),
        tasks=system.tasks,  # write_model sets each record's file and sha256: the system names what it saved
        task_tensors=task_tensors,
    )
    system.shared_sha256 = manifest["shared"]["sha256"]
    return manifest


def load_system(model_dir: Path, cfg: Config | None = None) -> System:
    """Rebuild a saved system (with `cfg` instead of its own config when given); the backbone and
    dimensions must match what the model was trained on."""
    model_dir = Path(model_dir)
    manifest = checkpoint.read_manifest(model_dir)
    try:
        cfg = cfg or config_from_dict(manifest["config"])
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
    system.shared_sha256 = manifest["shared"]["sha256"]
    for entry in manifest["tasks"]:
        attach_task(system, TaskRecord.from_entry(entry), checkpoint.read_checked(model_dir, entry))
    system.model.to(system.device).eval()
    return system


def saved_config(model_dir: Path) -> dict:
    """The config a saved model was trained with, as a plain tree (for comparisons)."""
    return checkpoint.read_manifest(Path(model_dir))["config"]
