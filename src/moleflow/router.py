"""Task router: which learned task does a test image belong to? (METHOD.md §2)

Each task keeps a Gaussian prototype of an image descriptor of its training images: a mean and a
shrinkage covariance, stored as its precision matrix and log-determinant. Nothing of a task's images is
kept, only these tensors, so routing respects the no-replay rule.

The notes' router (`descriptor: mean`, `shrinkage: -1` = Ledoit-Wolf, `likelihood: false`) sends an image
to the task with the smallest Mahalanobis distance of its global-average-pooled features. A defect moves
that mean along directions in which the product's good images hardly vary, so defective images stray
to another product (ELPV: a third of the defective mono cells went to poly). The default instead uses
the log root mean square of each channel over the image (its level and spread: colour and texture,
which a defect changes little), a fixed strong shrinkage towards the mean variance, and compares tasks
by Gaussian likelihood (distance + log-determinant), so a broad task does not collect every unusual
image (docs/localization.md, routing). Along each principal axis of a task's covariance the distance
counts as a Student-t's (`robust_dof`, 3): a defect that moves an image far along a few axes (a smashed
bottle, mostly dark) no longer outweighs another product's moderate distance along many.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from moleflow.config import RouterConfig

UNKNOWN = -1  # the routed task of an image no learned task explains (router.unknown = true)


DESCRIPTORS = ("mean", "log_rms")


def select_descriptor(descriptors: torch.Tensor, kind: str) -> torch.Tensor:
    """The router's part of the extractor's descriptors (B, 2C) = [mean (C), log RMS (C)]."""
    if kind not in DESCRIPTORS:
        raise ValueError(f"router.descriptor must be one of {list(DESCRIPTORS)}, got {kind!r}")
    c = descriptors.shape[1] // 2
    return descriptors[:, :c] if kind == "mean" else descriptors[:, c:]


@dataclass
class Prototype:
    mean: torch.Tensor  # (D,) float64
    precision: torch.Tensor  # (D, D) float64, inverse of the shrinkage covariance
    threshold: float  # squared distance above which an image is "unknown" for this task
    log_det: float  # log|Σ| of the shrinkage covariance (the likelihood comparison's penalty)
    # The covariance's principal axes (D, D) as columns, and 1 / variance along each (D,): from `precision`.
    axes: torch.Tensor = field(init=False, repr=False)
    axis_precision: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.axis_precision, self.axes = torch.linalg.eigh(self.precision)

    def axis_distances(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, D) -> (B, D): squared distance to the mean along each principal axis, in its variances
        (their sum is the squared Mahalanobis distance)."""
        return ((x.double() - self.mean) @ self.axes).pow(2) * self.axis_precision

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "router.mean": self.mean,
            "router.precision": self.precision,
            "router.threshold": torch.tensor([self.threshold], dtype=torch.float64),
            "router.log_det": torch.tensor([self.log_det], dtype=torch.float64),
        }

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor]) -> "Prototype":
        return Prototype(
            tensors["router.mean"].double(), tensors["router.precision"].double(), float(tensors["router.threshold"][0]),
            float(tensors["router.log_det"][0]),
        )


def fit_prototype(descriptors: torch.Tensor, quantile: float = 0.99, shrinkage: float = -1.0, margin: float = 1.5) -> Prototype:
    """Mean and shrinkage precision of a task's training descriptors (N, D).

    `shrinkage` < 0: Ledoit-Wolf's data-chosen intensity (the notes'); λ in [0, 1]: (1 − λ)·S + λ·(tr S / D)·I.
    """
    x = descriptors.detach().double().cpu().numpy()
    if x.shape[0] < 2:
        raise ValueError("a task needs at least 2 training images to fit its routing prototype")
    if shrinkage < 0:
        lw = LedoitWolf().fit(x)
        mean, cov = lw.location_, lw.covariance_
    else:
        mean = x.mean(axis=0)
        sample = np.atleast_2d(np.cov(x, rowvar=False))
        d = sample.shape[0]
        cov = (1.0 - shrinkage) * sample + shrinkage * (np.trace(sample) / d) * np.eye(d)
    cov = cov + 1e-12 * max(np.trace(cov) / cov.shape[0], 1e-12) * np.eye(cov.shape[0])  # never singular
    _, log_det = np.linalg.slogdet(cov)  # cov is positive definite: the sign is +1
    mean_t, precision = torch.from_numpy(np.asarray(mean)), torch.from_numpy(np.linalg.inv(cov))
    dist = _sq_mahalanobis(torch.from_numpy(x), mean_t, precision)
    # In-sample distances are optimistic, so the unknown threshold is a high quantile with a margin
    # (TaskRouter.add_task replaces it by an out-of-sample one when it has held-out images).
    threshold = float(np.quantile(dist.numpy(), quantile)) * margin
    return Prototype(mean_t, precision, threshold, float(log_det))


def _sq_mahalanobis(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    diff = x.double() - mean  # (B, D)
    return ((diff @ precision) * diff).sum(dim=1)  # (B,)


class TaskRouter:
    """Batched Mahalanobis routing with the `oracle`, `hybrid` and `unknown` options of the config."""

    def __init__(self, cfg: RouterConfig = RouterConfig()) -> None:
        if cfg.mode not in ("mahalanobis", "oracle", "hybrid"):
            raise ValueError(f"router mode must be mahalanobis, oracle or hybrid, not {cfg.mode!r}")
        if cfg.descriptor not in DESCRIPTORS:
            raise ValueError(f"router descriptor must be one of {list(DESCRIPTORS)}, not {cfg.descriptor!r}")
        self.cfg = cfg
        self.prototypes: dict[int, Prototype] = {}

    @property
    def num_tasks(self) -> int:
        return len(self.prototypes)

    def add_task(self, task: int, descriptors: torch.Tensor, held_out: torch.Tensor | None = None) -> None:
        """The task's prototype from its training descriptors (N, 2C). With `held_out` (indices of rows),
        the unknown threshold is calibrated out of sample: on those rows' distances to a prototype
        fitted without them (in-sample distances are smaller than a new image's)."""
        if task in self.prototypes:
            raise ValueError(f"the router already has task {task}")
        x = select_descriptor(descriptors, self.cfg.descriptor)
        proto = fit_prototype(x, self.cfg.unknown_quantile, self.cfg.shrinkage, self.cfg.unknown_margin)
        if held_out is not None and len(held_out) > 0:
            keep = torch.ones(len(x), dtype=torch.bool)
            keep[held_out] = False
            fold = fit_prototype(x[keep], self.cfg.unknown_quantile, self.cfg.shrinkage)
            dist = _sq_mahalanobis(x[held_out], fold.mean, fold.precision)
            threshold = float(np.quantile(dist.numpy(), self.cfg.unknown_quantile)) * self.cfg.unknown_margin
            proto = dataclasses.replace(proto, threshold=threshold)
        self.prototypes[task] = proto

    def set_prototype(self, task: int, proto: Prototype) -> None:
        self.prototypes[task] = proto

    def distances(self, descriptors: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of each image (extractor descriptors (B, 2C)) to each task: (B, T)."""
        tasks = sorted(self.prototypes)
        x = select_descriptor(descriptors, self.cfg.descriptor)
        return torch.stack([_sq_mahalanobis(x, self.prototypes[t].mean, self.prototypes[t].precision) for t in tasks], dim=1)

    def robust_distances(self, descriptors: torch.Tensor) -> torch.Tensor:
        """(B, T): per task, Σ over its principal axes of (ν + 1)·log(1 + u²/ν), with u² the squared
        distance along the axis in its variance and ν = `robust_dof`: −2 log of a product of Student-t
        densities up to the log-determinant. For large u² it grows as log u², not u², so no single axis
        decides; for small u² it is ≈ u² (ν + 1)/ν, the Mahalanobis distance."""
        nu = self.cfg.robust_dof
        x = select_descriptor(descriptors, self.cfg.descriptor)
        return torch.stack([((nu + 1) * torch.log1p(self.prototypes[t].axis_distances(x) / nu)).sum(dim=1)
                            for t in sorted(self.prototypes)], dim=1)

    def _penalties(self) -> torch.Tensor:
        """(T,) log|Σ_t|, added to the squared distance with `likelihood` (−2 log N(d; μ_t, Σ_t) + const)."""
        return torch.tensor([self.prototypes[t].log_det for t in sorted(self.prototypes)], dtype=torch.float64)

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
        if self.cfg.mode == "oracle":
            if true_tasks is None:
                raise ValueError("oracle routing needs the true task of every image")
            return true_tasks.clone().long()
        if not self.prototypes:
            raise ValueError("the router has no tasks yet")
        tasks = torch.tensor(sorted(self.prototypes), dtype=torch.long)
        thresholds = torch.tensor([self.prototypes[int(t)].threshold for t in tasks], dtype=torch.float64)
        dist = self.distances(descriptors)  # (B, T)
        d = dist / thresholds  # (B, T) in units of each task's own threshold
        # `calibrated`: compare tasks in those units. A prototype fitted on N images in D dimensions
        # sees its own images closer than new ones by a factor that depends on N/D; on ELPV this
        # routed defective mono cells to poly less often (80% -> 85% of mono test cells right), but
        # the quantile is a noisy scale with few images. `likelihood`: distance + log|Σ_t|.
        if self.cfg.calibrated:
            choice = d
        else:
            choice = self.robust_distances(descriptors) if self.cfg.robust_dof > 0 else dist
            if self.cfg.likelihood:
                choice = choice + self._penalties()
        routed = tasks[choice.argmin(dim=1)]
        if self.cfg.mode == "hybrid" and len(tasks) > 1:
            if task_nll is None:
                raise ValueError("hybrid routing needs the flow's likelihood (task_nll)")
            k = min(self.cfg.hybrid_top_k, len(tasks))
            cand = tasks[choice.topk(k, dim=1, largest=False).indices]  # (B, k)
            index = torch.arange(len(descriptors))
            nll = torch.stack([task_nll(index, cand[:, j]) for j in range(k)], dim=1)  # (B, k)
            routed = cand.gather(1, nll.argmin(dim=1, keepdim=True)).squeeze(1)
        if self.cfg.unknown:
            beyond = d.min(dim=1).values > 1.0  # beyond the nearest task's own threshold
            routed = torch.where(beyond, torch.full_like(routed, UNKNOWN), routed)
        return routed
