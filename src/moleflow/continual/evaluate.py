"""Evaluation of the continual protocol (METHOD.md §5).

After task t, every task j <= t is evaluated on its test set twice: with routing on (the model is not
told the task) and with the oracle task. Each metric forms a matrix R[t][j]; the final value is the mean
of the last row, and forgetting of task j is the best earlier R[.][j] minus the final R[T][j].
"""
from __future__ import annotations

import numpy as np
import torch

from moleflow.features.cache import FeatureSet
from moleflow.metrics import compute_metrics
from moleflow.results.schema import Metrics, TaskEval
from moleflow.router import UNKNOWN
from moleflow.scoring import Scorer, Scores


def _metrics(features: FeatureSet, scores: Scores) -> Metrics:
    masks = features.masks[:, 0].numpy().astype(bool) if features.masks is not None else None
    maps = scores.maps.numpy() if (scores.maps is not None and masks is not None) else None
    return Metrics.from_json(compute_metrics(features.labels.numpy(), scores.image.numpy(), masks, maps))


def _per_class(features: FeatureSet, scores: Scores, whole: Metrics) -> dict[str, Metrics]:
    """Metrics per class of a task; a one-class task reuses the task's own metrics (`whole`)."""
    names = np.array(features.class_names)
    classes = list(dict.fromkeys(features.class_names))
    if len(classes) == 1:
        return {classes[0]: whole}
    out = {}
    for name in classes:
        idx = torch.from_numpy(np.flatnonzero(names == name))
        out[name] = _metrics(features.subset(idx), scores.subset(idx))
    return out


def decision_rates(features: FeatureSet, scores: Scores, thresholds: dict[int, float]) -> tuple[float | None, float | None]:
    """(false-alarm rate on the good images, miss rate on the defective ones) of the verdict
    score > threshold of the task each image was scored under; None where there are no such images."""
    thr = torch.tensor([thresholds[int(t)] for t in scores.tasks], dtype=scores.image.dtype)
    called = scores.image > thr
    good, bad = features.labels == 0, features.labels == 1
    false_alarm = float(called[good].float().mean()) if good.any() else None
    miss = float((~called[bad]).float().mean()) if bad.any() else None
    return false_alarm, miss


def evaluate_task(scorer: Scorer, features: FeatureSet, task: int, classes: list[str],
                  single_model_task: int | None = None, thresholds: dict[int, float] | None = None) -> tuple[TaskEval, Scores]:
    """Metrics of one task's test set with routing and with the oracle; returns the routed scores too.
    With `thresholds` (model task -> decision threshold), also the shipped decision's error rates.

    `single_model_task`: the baselines (`finetune`, `joint`) have one set of modules for every task;
    all images are scored under it and routing accuracy is not applicable (None).
    """
    if single_model_task is not None:
        routed = oracle = scorer.score_features(features, torch.full((len(features),), single_model_task))
        accuracy = None
    else:
        routed_tasks = scorer.route_features(features, task)
        correct = routed_tasks == task
        accuracy = float(correct.float().mean())
        # An image routed to "unknown" gets no flow; it is scored under the nearest task for the metrics
        # (and counted as misrouted), so the tables stay comparable.
        if (routed_tasks == UNKNOWN).any():
            router = scorer.router
            nearest = torch.tensor(sorted(router.prototypes))[router.distances(features.descriptors).argmin(1)]
            routed_tasks = torch.where(routed_tasks == UNKNOWN, nearest, routed_tasks)
        oracle = scorer.score_features(features, torch.full_like(routed_tasks, task))
        # Same task for every image: the scores are the oracle's, bit for bit.
        routed = oracle if bool(correct.all()) else scorer.score_features(features, routed_tasks)
    routed_metrics = _metrics(features, routed)
    false_alarm, miss = decision_rates(features, routed, thresholds) if thresholds is not None else (None, None)
    result = TaskEval(
        task=task, classes=tuple(classes), routed=routed_metrics, routing_accuracy=accuracy,
        oracle=routed_metrics if routed is oracle else _metrics(features, oracle),
        per_class=_per_class(features, routed, routed_metrics),
        n_test=len(features), n_defective=int(features.labels.sum()), false_alarm_rate=false_alarm, miss_rate=miss,
    )
    return result, routed
