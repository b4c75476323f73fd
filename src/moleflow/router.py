"""Task router: which learned task does a test image belong to? (METHOD.md §2)

Each task keeps a Gaussian prototype of the image descriptors (global-average-pooled backbone features)
of its training images: a mean and a Ledoit-Wolf shrinkage covariance, stored as its precision matrix.
A test image goes to the task with the smallest Mahalanobis distance. Nothing of a task's images is kept,
only these two tensors, so routing respects the no-replay rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

UNKNOWN = -1  # the routed task of an image no learned task explains (router.unknown = true)


@dataclass
class Prototype:
    mean: torch.Tensor  # (D,) float64
    precision: torch.Tensor  # (D, D) float64, inverse of the shrinkage covariance
    threshold: float  # squared distance above which an image is "unknown" for this task

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "router.mean": self.mean,
            "router.precision": self.precision,
            "router.threshold": torch.tensor([self.threshold], dtype=torch.float64),
        }

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor]) -> "Prototype":
        return Prototype(
            tensors["router.mean"].double(), tensors["router.precision"].double(), float(tensors["router.threshold"][0])
        )


def fit_prototype(descriptors: torch.Tensor, quantile: float = 0.99) -> Prototype:
    """Mean and Ledoit-Wolf precision of a task's training descriptors (N, D)."""
    x = descriptors.detach().double().cpu().numpy()
    if x.shape[0] < 2:
        raise ValueError("a task needs at least 2 training images to fit its routing prototype")
    lw = LedoitWolf().fit(x)
    mean = torch.from_numpy(lw.location_)
    precision = torch.from_numpy(lw.precision_)
    d = _sq_mahalanobis(torch.from_numpy(x), mean, precision)
    # In-sample distances are optimistic, so the unknown threshold is a high quantile with a margin.
    threshold = float(np.quantile(d.numpy(), quantile)) * 1.5
    return Prototype(mean, precision, threshold)


def _sq_mahalanobis(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    diff = x.double() - mean  # (B, D)
    return ((diff @ precision) * diff).sum(dim=1)  # (B,)


class TaskRouter:
    """Batched Mahalanobis routing with the `oracle`, `hybrid` and `unknown` options of the config."""

    def __init__(self, mode: str = "mahalanobis", hybrid_top_k: int = 2, unknown: bool = False, unknown_quantile: float = 0.99,
                 calibrated: bool = False):
        if mode not in ("mahalanobis", "oracle", "hybrid"):
            raise ValueError(f"router mode must be mahalanobis, oracle or hybrid, not {mode!r}")
        self.mode = mode
        self.hybrid_top_k = hybrid_top_k
        self.unknown = unknown
        self.unknown_quantile = unknown_quantile
        self.calibrated = calibrated
        self.prototypes: dict[int, Prototype] = {}

    @property
    def num_tasks(self) -> int:
        return len(self.prototypes)

    def add_task(self, task: int, descriptors: torch.Tensor) -> None:
        if task in self.prototypes:
            raise ValueError(f"the router already has task {task}")
        self.prototypes[task] = fit_prototype(descriptors, self.unknown_quantile)

    def set_prototype(self, task: int, proto: Prototype) -> None:
        self.prototypes[task] = proto

    def distances(self, descriptors: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of each image to each task: (B, T)."""
        tasks = sorted(self.prototypes)
        return torch.stack(
            [_sq_mahalanobis(descriptors, self.prototypes[t].mean, self.prototypes[t].precision) for t in tasks], dim=1
        )

    def route(
        self,
        descriptors: torch.Tensor,
        true_tasks: torch.Tensor | None = None,
        task_nll: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Task index per image (B,), `UNKNOWN` where no task fits (only with `unknown` on).

        `true_tasks` is used by the oracle mode only. `task_nll(index, tasks)` gives the flow's mean
        patch NLL of images `index` under `tasks`; the hybrid mode needs it.
        """
        if self.mode == "oracle":
            if true_tasks is None:
                raise ValueError("oracle routing needs the true task of every image")
            return true_tasks.clone().long()
        if not self.prototypes:
            raise ValueError("the router has no tasks yet")
        tasks = torch.tensor(sorted(self.prototypes), dtype=torch.long)
        thresholds = torch.tensor([self.prototypes[int(t)].threshold for t in tasks], dtype=torch.float64)
        d = self.distances(descriptors) / thresholds  # (B, T) in units of each task's own threshold
        # `calibrated`: compare tasks in those units. A prototype fitted on N images in D dimensions
        # sees its own images closer than new ones by a factor that depends on N/D; on ELPV this
        # routed defective mono cells to poly less often (80% -> 85% of mono test cells right), but
        # the quantile is a noisy scale with few images, so plain Mahalanobis (the notes') is the default.
        choice = d if self.calibrated else self.distances(descriptors)
        routed = tasks[choice.argmin(dim=1)]
        if self.mode == "hybrid" and len(tasks) > 1:
            if task_nll is None:
                raise ValueError("hybrid routing needs the flow's likelihood (task_nll)")
            k = min(self.hybrid_top_k, len(tasks))
            cand = tasks[choice.topk(k, dim=1, largest=False).indices]  # (B, k)
            index = torch.arange(len(descriptors))
            nll = torch.stack([task_nll(index, cand[:, j]) for j in range(k)], dim=1)  # (B, k)
            routed = cand.gather(1, nll.argmin(dim=1, keepdim=True)).squeeze(1)
        if self.unknown:
            beyond = d.min(dim=1).values > 1.0  # beyond the nearest task's own threshold
            routed = torch.where(beyond, torch.full_like(routed, UNKNOWN), routed)
        return routed
