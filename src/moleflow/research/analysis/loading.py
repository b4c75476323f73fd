"""What the analysis reads: the two run directories (model, config.yaml, results.json), subsampled
backbone features of a task's images, and the flow's outputs on them with each block's log-det (through
the project's Scorer, the one path from features to the flow)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from moleflow.config import ConfigError, LossConfig, config_to_dict
from moleflow.continual.system import System, load_system
from moleflow.data import ImageDataset, build_dataset
from moleflow.features.cache import FeatureSet, extract_features
from moleflow.research.compare import flatten
from moleflow.scoring import Scorer

METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class TaskResults:
    """What the analysis takes from a run's results.json for one task."""

    metrics: dict[str, float | None]  # METRICS after the last step of the run (routing on)
    grad_norms: list[dict[str, float]]  # per epoch of the step that learned the task: block -> gradient norm


def read_task_results(run_dir: Path, task: int) -> TaskResults:
    """The one place results.json is read (as a dict, by the keys of its current format)."""
    results = json.loads((Path(run_dir) / "results.json").read_text())
    steps = results.get("steps") or []
    per_task = steps[-1].get("per_task", []) if steps else []
    entry = next((e for e in per_task if e.get("task") == task), {})
    train = next(((s.get("train") or {}) for s in steps if s.get("after_task") == task), {})
    return TaskResults({m: entry.get(m) for m in METRICS}, list(train.get("grad_norms") or []))


@dataclass
class Run:
    label: str  # "mean-only" / "tail-aware" / sweep directory name
    path: Path
    system: System
    task: int
    results: TaskResults

    @property
    def loss(self) -> LossConfig:
        return self.system.cfg.loss

    def metrics(self) -> dict[str, float | None]:
        """This task's metrics after the last step of the run (routing on)."""
        return dict(self.results.metrics)

    def grad_norms(self) -> list[dict[str, float]]:
        return list(self.results.grad_norms)

    def flow(self, patches: torch.Tensor) -> FlowOutputs:
        """The run's flow under its task on `patches` (N, H, W, C)."""
        return flow_outputs(self.system.scorer, self.task, patches, self.system.cfg.model.dia_blocks)


def open_run(path: Path, label: str, task: int) -> Run:
    path = Path(path)
    for name in ("config.yaml", "results.json", "model"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path} is not a finished run directory: {name} is missing (train it with `moleflow fit ... --out {path}`)")
    results = read_task_results(path, task)
    system = load_system(path / "model")
    if not 0 <= task < len(system.tasks):
        raise ConfigError(f"--task {task}: the model in {path / 'model'} has tasks 0..{len(system.tasks) - 1}")
    return Run(label, path, system, task, results)


def config_diff(a: Run, b: Run) -> list[tuple[str, Any, Any]]:
    """(dotted key, value in a, value in b) of the config.yaml keys that differ, output.* left out."""
    fa = flatten(yaml.safe_load((a.path / "config.yaml").read_text()))
    fb = flatten(yaml.safe_load((b.path / "config.yaml").read_text()))
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb))
            if not k.startswith("output.") and fa.get(k) != fb.get(k)]


# --------------------------------------------------------------------------- features


def even_pick(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))


def _split_indices(labels: list[int], split: str, per_spec: int) -> list[int]:
    """Which images of one class to analyse: evenly spread; on the test split both kinds, up to half goods,
    the rest defects (or whatever exists)."""
    if split != "test":
        return even_pick(len(labels), per_spec)
    good = [i for i, y in enumerate(labels) if y == 0]
    bad = [i for i, y in enumerate(labels) if y != 0]
    k_good = min(len(good), max(per_spec // 2, per_spec - len(bad)))
    k_bad = min(len(bad), per_spec - k_good)
    return [good[i] for i in even_pick(len(good), k_good)] + [bad[i] for i in even_pick(len(bad), k_bad)]


class FeatureStore:
    """Subsampled features of a task's images, computed once per backbone/data setting and reused."""

    def __init__(self, max_images: int, progress: bool) -> None:
        self.max_images = max_images
        self.progress = progress
        self._cache: dict[str, FeatureSet] = {}

    def get(self, run: Run, split: str) -> FeatureSet:
        system = run.system
        specs = system.tasks[run.task].specs
        key = json.dumps([system.extractor.identity(), config_to_dict(system.cfg.data), specs, split], sort_keys=True, default=str)
        if key not in self._cache:
            self._cache[key] = self._extract(system, specs, split)
        return self._cache[key]

    def _extract(self, system: System, specs: list[str], split: str) -> FeatureSet:
        per_spec = max(1, math.ceil(self.max_images / len(specs)))
        sets = []
        for spec in specs:
            ds = build_dataset(system.cfg.data, spec, split)
            idx = _split_indices(ds.labels, split, per_spec)
            sub = ImageDataset([ds.samples[i] for i in sorted(idx)], ds.image_size, ds.has_masks)
            sets.append(extract_features(
                system.extractor, sub, batch_size=system.cfg.backbone.batch_size,
                cache_dir=system.cfg.backbone.cache_dir or None, progress=self.progress, desc=f"features {spec}/{split}",
            ))
        return sets[0] if len(sets) == 1 else FeatureSet.concat(sets)


# --------------------------------------------------------------------------- the flow


@dataclass
class FlowOutputs:
    z: torch.Tensor  # (N, H, W, C')
    log_det: torch.Tensor  # (N, H, W) total
    block_logdets: list[torch.Tensor]  # per base-flow coupling block, (N, H, W) each
    dia_logdet: torch.Tensor  # (N, H, W), zeros without DIA


def flow_outputs(scorer: Scorer, task: int, patches: torch.Tensor, dia_blocks: int, batch_size: int = 16) -> FlowOutputs:
    """The flow under task `task` with each coupling block's log-det (same order as BaseFlow.forward), by
    `Scorer.flow_parts`; `dia_blocks` (the model config's) says whether its last part is DIA's."""
    zs, lds, parts = [], [], []
    for start in range(0, len(patches), batch_size):
        z, ld, blocks = scorer.flow_parts(patches[start : start + batch_size], task)  # DIA's log-det last, if any
        zs.append(z)
        lds.append(ld)
        parts.append(blocks if dia_blocks > 0 else [*blocks, torch.zeros_like(ld)])
    per_part = [torch.cat(p) for p in zip(*parts)]
    return FlowOutputs(torch.cat(zs), torch.cat(lds), per_part[:-1], per_part[-1])
