"""Evaluation of the continual protocol (METHOD.md §5).

After task t, every task j <= t is evaluated on its test set twice: with routing on (the model is not
told the task) and with the oracle task. Each metric forms a matrix R[t][j]; the final value is the mean
of the last row, and forgetting of task j is the best earlier R[.][j] minus the final R[T][j].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moleflow.config import Config
from moleflow.features.cache import FeatureSet
from moleflow.metrics import compute_metrics
from moleflow.model.mole_flow import MoLEFlow
from moleflow.router import UNKNOWN, TaskRouter
from moleflow.scoring import anomaly_map, image_score, patch_scores, require_finite



@dataclass
class Scores:
    """What the model says about a set of images, under given task ids."""

    tasks: torch.Tensor  # (N,) the task each image was scored under
    image: torch.Tensor  # (N,) image scores
    patch: torch.Tensor  # (N, H, W) patch scores
    maps: torch.Tensor | None  # (N, S, S) anomaly maps, when asked for


@torch.no_grad()
def score_features(
    model: MoLEFlow,
    features: FeatureSet,
    tasks: torch.Tensor,
    cfg: Config,
    device: torch.device,
    with_maps: bool = True,
    batch_size: int = 16,
) -> Scores:
    """Score cached features under `tasks` (N,); a batch that mixes tasks is split per task by the model."""
    model.eval()
    img, patch, maps = [], [], []
    for start in range(0, len(features), batch_size):
        x = features.patches[start : start + batch_size].to(device=device, dtype=torch.float32)  # (B, H, W, C)
        t = tasks[start : start + batch_size].to(device)
        z, log_det = model.forward_routed(x, t)
        s = patch_scores(z, log_det, cfg.scoring.patch_score)  # (B, H, W)
        require_finite(s, features.paths[start : start + len(s)], f"anomaly scores under task(s) {sorted(set(t.tolist()))}")
        patch.append(s.cpu())
        img.append(image_score(s, cfg.scoring.aggregation, cfg.scoring.top_k).cpu())
        if with_maps:
            maps.append(anomaly_map(s, cfg.data.image_size, cfg.scoring.blur_sigma).cpu())
    return Scores(
        tasks=tasks.clone(),
        image=torch.cat(img),
        patch=torch.cat(patch),
        maps=torch.cat(maps) if with_maps else None,
    )


def task_nll_fn(model: MoLEFlow, features: FeatureSet, device: torch.device):
    """For the hybrid router: mean patch score of images `index` under `tasks`."""

    @torch.no_grad()
    def fn(index: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        x = features.patches[index].to(device=device, dtype=torch.float32)
        z, log_det = model.forward_routed(x, tasks.to(device))
        return patch_scores(z, log_det).mean(dim=(1, 2)).cpu()

    return fn


def route_features(router: TaskRouter, model: MoLEFlow, features: FeatureSet, true_task: int, device: torch.device) -> torch.Tensor:
    true = torch.full((len(features),), true_task, dtype=torch.long)
    nll = task_nll_fn(model, features, device) if router.mode == "hybrid" else None
    return router.route(features.descriptors, true_tasks=true, task_nll=nll)


def _metrics(features: FeatureSet, scores: Scores) -> dict:
    masks = features.masks[:, 0].numpy().astype(bool) if features.masks is not None else None
    maps = scores.maps.numpy() if (scores.maps is not None and masks is not None) else None
    return compute_metrics(features.labels.numpy(), scores.image.numpy(), masks, maps)


def _per_class(features: FeatureSet, scores: Scores, whole: dict | None = None) -> dict[str, dict]:
    """Metrics per class of a task; a one-class task reuses the task's own metrics (`whole`)."""
    names = np.array(features.class_names)
    classes = list(dict.fromkeys(features.class_names))
    if len(classes) == 1 and whole is not None:
        return {classes[0]: dict(whole)}
    out = {}
    for name in classes:
        idx = torch.from_numpy(np.flatnonzero(names == name))
        sub = features.subset(idx)
        sub_scores = Scores(scores.tasks[idx], scores.image[idx], scores.patch[idx], None if scores.maps is None else scores.maps[idx])
        out[name] = _metrics(sub, sub_scores)
    return out


def evaluate_task(
    model: MoLEFlow,
    router: TaskRouter,
    features: FeatureSet,
    task: int,
    cfg: Config,
    device: torch.device,
    single_model_task: int | None = None,
) -> tuple[dict, Scores]:
    """Metrics of one task's test set with routing and with the oracle; returns the routed scores too.

    `single_model_task`: the baselines (`finetune`, `joint`) have one set of modules for every task;
    all images are scored under it and routing accuracy is not applicable (null).
    """
    if single_model_task is not None:
        sc = score_features(model, features, torch.full((len(features),), single_model_task), cfg, device)
        metrics = _metrics(features, sc)
        return {"task": task, **metrics, "routing_accuracy": None, "oracle": dict(metrics),
                "per_class": _per_class(features, sc, metrics), "n_test": len(features),
                "n_defective": int(features.labels.sum())}, sc
    routed_tasks = route_features(router, model, features, task, device)
    oracle_tasks = torch.full_like(routed_tasks, task)
    correct = routed_tasks == task
    # An image routed to "unknown" gets no flow; it is scored under the nearest task for the metrics
    # (and counted as misrouted), so the tables stay comparable.
    if (routed_tasks == UNKNOWN).any():
        nearest = torch.tensor(sorted(router.prototypes))[router.distances(features.descriptors).argmin(1)]
        routed_tasks = torch.where(routed_tasks == UNKNOWN, nearest, routed_tasks)
    oracle = score_features(model, features, oracle_tasks, cfg, device)
    if bool(correct.all()):
        routed = oracle  # same task for every image: the scores are the oracle's, bit for bit
    else:
        routed = score_features(model, features, routed_tasks, cfg, device)
    routed_metrics = _metrics(features, routed)
    result = {
        "task": task,
        **routed_metrics,
        "routing_accuracy": float(correct.float().mean()),
        "oracle": dict(routed_metrics) if routed is oracle else _metrics(features, oracle),
        "per_class": _per_class(features, routed, routed_metrics),
        "n_test": len(features),
        "n_defective": int(features.labels.sum()),
    }
    return result, routed
