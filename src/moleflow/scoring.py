"""The one place images become scores: features → route → flow → patch scores → map → image score.

`Scorer` is used by every path that scores images: evaluation, threshold calibration, `predict`, the
analyses (with the per-block log-det hook `flow_parts`), and the service and exports that build on it.
The functions below it are its steps: per-patch score → anomaly map (upsampled, Gaussian-blurred) →
image score.

The blur matches scipy.ndimage.gaussian_filter (the usual post-processing in the anomaly-detection
literature): a normalised Gaussian of radius ⌈4σ⌉ and half-sample symmetric borders
("d c b a | a b c d", scipy's default mode "reflect"), so a constant map stays constant.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moleflow.config import ScoringConfig
from moleflow.features.backbone import FeatureExtractor
from moleflow.features.cache import FeatureSet
from moleflow.model.mole_flow import MoLEFlow
from moleflow.router import UNKNOWN, TaskRouter


class ScoreError(FloatingPointError):
    """NaN or infinite scores (or the features behind them); the message names the images."""


def require_finite(values: torch.Tensor, names: list[str], what: str) -> None:
    """ScoreError naming the images (first dim of `values`) whose `what` holds NaN or inf."""
    bad = ~torch.isfinite(values.reshape(len(values), -1)).all(dim=1)
    if bad.any():
        listed = [names[i] for i in bad.nonzero().squeeze(1).tolist()]
        more = f" and {len(listed) - 3} more" if len(listed) > 3 else ""
        raise ScoreError(f"non-finite {what} (NaN or inf) for {', '.join(listed[:3])}{more}; check these images, "
                         "and if they are fine retrain the task with a lower train.lr")


def patch_scores(z: torch.Tensor, log_det: torch.Tensor, kind: str = "nll") -> torch.Tensor:
    """Per patch (B, H, W): "nll" = ½‖z‖² − log|det J|, the NLL up to the constant C/2·log(2π) (the notes');
    "latent" = ½‖z‖² alone, FastFlow's map: how far the patch lands from the latent Gaussian's centre.

    The log-det measures how much the flow stretches space at the patch. It belongs in a likelihood (and
    in the hybrid router, which compares likelihoods between tasks), but as a map it mostly varies with
    the flow's local geometry, not with how unusual the patch is (docs/localization.md measures both).
    """
    if z.dim() != 4 or tuple(log_det.shape) != tuple(z.shape[:-1]):
        raise ValueError(f"expected z (B, H, W, C) and log_det (B, H, W); got {tuple(z.shape)} and {tuple(log_det.shape)}")
    half_sq = 0.5 * z.pow(2).sum(dim=-1)
    if kind == "nll":
        return half_sq - log_det
    if kind == "latent":
        return half_sq
    raise ValueError(f"scoring.patch_score must be 'nll' or 'latent', got {kind!r}")


def blend_weight(model: MoLEFlow, cfg: ScoringConfig) -> float:
    """The active task's memory weight w in the blend: its stored choice under `memory_weight_from:
    synthetic` (continual/blend_weight.py), else (fixed, or a task saved without one) `memory_weight`."""
    stored = model.memory_weight() if cfg.memory_weight_from == "synthetic" else None
    return cfg.memory_weight if stored is None else stored


def _known_weight(cfg: ScoringConfig, weight: float | None) -> float | None:
    """`weight` (a task's own), else the config's fixed weight; None when each task chooses its own."""
    if weight is None and cfg.memory_weight_from == "fixed":
        return cfg.memory_weight
    return weight


def reads_flow(cfg: ScoringConfig, weight: float | None = None) -> bool:
    """Whether `task_patch_scores` reads the flow: not with a blend whose memory weight is 1 (`weight`, the
    task's own; without it, `cfg`'s fixed weight, or True when each task chooses its own)."""
    w = _known_weight(cfg, weight)
    return cfg.patch_score != "blend" or w is None or w < 1.0


def task_patch_scores(model: MoLEFlow, x: torch.Tensor, cfg: ScoringConfig) -> torch.Tensor:
    """Under the model's active task: patches x (B, H, W, C) -> patch scores (B, H, W) of `cfg.patch_score`.

    "blend" = (1 − w)·‖z‖ / m_z + w·d / m_d, with d the distance to the task's nearest memory patch
    (PatchCore's score), w the task's memory weight (`blend_weight`), and m_z, m_d their medians over the
    task's training patches: ‖z‖ (not ½‖z‖²) so both parts grow linearly with a patch's distance from the
    normal ones.
    """
    if cfg.patch_score != "blend":
        z, log_det = model(x)  # (B, H, W, C'), (B, H, W)
        return patch_scores(z, log_det, cfg.patch_score)
    w = blend_weight(model, cfg)
    if not reads_flow(cfg, w):
        d, scale = model.memory_distance(x)  # (B, H, W), (2,)
        return d / scale[1]  # the flow would not count
    flow, near = blend_parts(model, x)
    return (1 - w) * flow + w * near


def blend_parts(model: MoLEFlow, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Under the active task: patches x (B, H, W, C) -> the blend's two parts (B, H, W) each, in the task's
    training medians: ‖z‖ / m_z and d / m_d (d: distance to the nearest memory patch)."""
    d, scale = model.memory_distance(x)  # (B, H, W), (2,)
    z, _ = model(x)  # (B, H, W, C')
    return z.norm(dim=-1) / scale[0], d / scale[1]


def routed_patch_scores(model: MoLEFlow, x: torch.Tensor, tasks: torch.Tensor, cfg: ScoringConfig) -> torch.Tensor:
    """Each image of x (B, H, W, C) under its own task (B,): `task_patch_scores` per task present."""
    out = x.new_empty(x.shape[:3])  # (B, H, W)
    tasks = tasks.to(x.device)
    for t in torch.unique(tasks).tolist():
        idx = (tasks == t).nonzero(as_tuple=True)[0]
        with model.use_task(t):
            out[idx] = task_patch_scores(model, x.index_select(0, idx), cfg)
    return out


def patch_score_label(cfg: ScoringConfig, weight: float | None = None) -> str:
    """What a map of `task_patch_scores(..., cfg)` shows, for colour bars and legends; `weight`: the task's
    own memory weight (`blend_weight`), without which a blend is named by its parts."""
    if cfg.patch_score == "blend":
        if not reads_flow(cfg, weight):
            return "anomaly score (nearest-patch distance / its training median)"
        w = _known_weight(cfg, weight)
        if w is None:
            return "anomaly score (flow ‖z‖ and nearest-patch distance, in training medians)"
        return f"anomaly score ({1 - w:g}·flow ‖z‖ + {w:g}·nearest-patch distance, in training medians)"
    return {"nll": "anomaly score (patch NLL)", "latent": "anomaly score (½‖z‖² per patch)"}[cfg.patch_score]


def gaussian_kernel1d(sigma: float, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
    """Normalised Gaussian of radius ⌈4σ⌉, length 2·⌈4σ⌉ + 1."""
    radius = math.ceil(4.0 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def _symmetric_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-n axis padded by `pad` on both sides with half-sample symmetry (any pad)."""
    i = torch.arange(-pad, n + pad, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps; sigma <= 0 returns the maps unchanged."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma, maps.dtype, maps.device)
    r = (k.numel() - 1) // 2
    b, h, w = maps.shape
    x = maps[:, None]  # (B, 1, H, W)
    x = x.index_select(3, _symmetric_index(w, r, maps.device))  # (B, 1, H, W + 2r)
    x = F.conv2d(x, k.view(1, 1, 1, -1))  # (B, 1, H, W)
    x = x.index_select(2, _symmetric_index(h, r, maps.device))  # (B, 1, H + 2r, W)
    x = F.conv2d(x, k.view(1, 1, -1, 1))  # (B, 1, H, W)
    return x[:, 0]


def anomaly_map(scores: torch.Tensor, image_size: int, sigma: float = 4.0) -> torch.Tensor:
    """Patch scores (B, H, W) -> pixel map (B, S, S): bilinear upsampling, then Gaussian blur."""
    if scores.dim() != 3:
        raise ValueError(f"anomaly_map expects patch scores (B, H, W), got {tuple(scores.shape)}")
    up = F.interpolate(scores[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False)
    return gaussian_blur(up[:, 0], sigma)


def image_score(scores: torch.Tensor, aggregation: str = "topk", top_k: int = 3) -> torch.Tensor:
    """(B, H, W) (patch scores or a pixel map) -> (B,): mean of the top-k values, the max, or the mean."""
    flat = scores.reshape(scores.shape[0], -1)
    if aggregation == "topk":
        if top_k < 1:
            raise ValueError(f"scoring.top_k must be >= 1, got {top_k}")
        return flat.topk(min(top_k, flat.shape[1]), dim=1).values.mean(dim=1)
    if aggregation == "max":
        return flat.max(dim=1).values
    if aggregation == "mean":
        return flat.mean(dim=1)
    raise ValueError(f"scoring.aggregation must be one of topk, max, mean; got {aggregation!r}")


# --------------------------------------------------------------------------- the scorer


@dataclass
class Scores:
    """What the model says about a set of images, under given task ids."""

    tasks: torch.Tensor  # (N,) the task each image was scored under (UNKNOWN: not scored)
    image: torch.Tensor  # (N,) image scores (NaN where the task is UNKNOWN)
    patch: torch.Tensor  # (N, H, W) patch scores
    maps: torch.Tensor | None  # (N, S, S) anomaly maps, when asked for

    def subset(self, index: torch.Tensor) -> "Scores":
        return Scores(self.tasks[index], self.image[index], self.patch[index], None if self.maps is None else self.maps[index])


_MEMORY_ONLY = ScoringConfig(patch_score="blend", memory_weight_from="fixed", memory_weight=1.0)  # the memory's distance over its median


class Scorer:
    """A trained model and its router, turning features (or images, given the extractor) into scores.

    Results are on the CPU; the flow runs on `device`. Images routed to `UNKNOWN` get no flow: NaN
    image score, zero patch scores and map.
    """

    def __init__(self, model: MoLEFlow, router: TaskRouter, cfg: ScoringConfig, image_size: int, device: torch.device,
                 extractor: FeatureExtractor | None = None) -> None:
        self.model, self.router, self.cfg, self.image_size, self.device = model, router, cfg, image_size, device
        self.extractor = extractor

    # ---------------------------------------------------------------- routing

    def _likelihood_fn(self, patches: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """For the hybrid router: per image of `index` of `patches` under `tasks`, the flow's mean patch
        NLL (a likelihood compares tasks, whatever `scoring.patch_score` the maps use), or with
        `router.hybrid_score: memory` the mean distance to the task's patch memory over its training median."""
        if self.router.cfg.mode != "hybrid":
            return None
        memory = self.router.cfg.hybrid_score == "memory"

        @torch.no_grad()
        def nll(index: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
            x = patches[index.to(patches.device)].to(device=self.device, dtype=torch.float32)  # (b, H, W, C)
            if memory:
                return routed_patch_scores(self.model, x, tasks, _MEMORY_ONLY).mean(dim=(1, 2)).cpu()
            z, log_det = self.model.forward_routed(x, tasks.to(self.device))
            return patch_scores(z, log_det, "nll").mean(dim=(1, 2)).cpu()

        return nll

    def route(self, patches: torch.Tensor, descriptors: torch.Tensor, true_tasks: torch.Tensor | None = None) -> torch.Tensor:
        """Task id per image (B,) from its descriptor (and, hybrid, the flow's likelihood of its patches)."""
        self.model.eval()
        return self.router.route(descriptors.cpu(), true_tasks=true_tasks, task_nll=self._likelihood_fn(patches))

    def route_features(self, features: FeatureSet, true_task: int) -> torch.Tensor:
        true = torch.full((len(features),), true_task, dtype=torch.long)
        return self.route(features.patches, features.descriptors, true_tasks=true)

    # ---------------------------------------------------------------- scoring

    @torch.no_grad()
    def score_patches(self, patches: torch.Tensor, tasks: torch.Tensor, names: list[str], with_maps: bool = True) -> Scores:
        """One batch: patches (B, H, W, C) under tasks (B,) → Scores; `names` (the files) for errors."""
        self.model.eval()
        b, h, w, _ = patches.shape
        image = torch.full((b,), float("nan"))
        patch = torch.zeros(b, h, w)
        maps = torch.zeros(b, self.image_size, self.image_size) if with_maps else None
        known = (tasks != UNKNOWN).nonzero().squeeze(1)
        if len(known):
            x = patches[known.to(patches.device)].to(device=self.device, dtype=torch.float32)  # (b, H, W, C)
            s = routed_patch_scores(self.model, x, tasks[known], self.cfg)  # (b, H, W)
            require_finite(s, [names[i] for i in known.tolist()], f"anomaly scores under task(s) {sorted(set(tasks[known].tolist()))}")
            patch[known] = s.cpu()
            image[known] = image_score(s, self.cfg.aggregation, self.cfg.top_k).cpu()
            if maps is not None:
                maps[known] = anomaly_map(s, self.image_size, self.cfg.blur_sigma).cpu()
        return Scores(tasks.clone(), image, patch, maps)

    def score_features(self, features: FeatureSet, tasks: torch.Tensor, with_maps: bool = True, batch_size: int = 16) -> Scores:
        """Cached features under `tasks` (N,), in batches; a batch that mixes tasks is split per task."""
        parts = [self.score_patches(features.patches[s : s + batch_size], tasks[s : s + batch_size],
                                    list(features.paths[s : s + batch_size]), with_maps)
                 for s in range(0, len(features), batch_size)]
        return Scores(tasks.clone(), torch.cat([p.image for p in parts]), torch.cat([p.patch for p in parts]),
                      torch.cat([p.maps for p in parts]) if with_maps else None)

    @torch.no_grad()
    def score_images(self, images: torch.Tensor, names: list[str] | None = None) -> Scores:
        """Images (B, 3, S, S) in [0, 1], product unknown → routed task, image score, map (needs the extractor)."""
        if self.extractor is None:
            raise ValueError("score_images needs the Scorer's feature extractor")
        names = names or [f"image {i} of the batch" for i in range(len(images))]
        patches, desc = self.extractor(images.to(self.device))  # (B, H, W, C), (B, D)
        require_finite(patches, names, "backbone features")
        return self.score_patches(patches, self.route(patches, desc), names)

    # ---------------------------------------------------------------- analysis hook

    @torch.no_grad()
    def flow_parts(self, patches: torch.Tensor, task: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Patches (B, H, W, C) under `task` → z (B, H, W, C'), the flow's log|det J| (B, H, W) (base flow +
        DIA, without the whitening constant), and each block's log-det in order (base blocks, then DIA)."""
        self.model.eval()
        blocks: list[torch.Tensor] = []
        with self.model.use_task(task):
            x = patches.to(device=self.device, dtype=torch.float32)
            z, log_det = self.model.flow_forward(self.model.prepare(x), block_logdets=blocks)
        return z.cpu(), log_det.cpu(), [b.cpu() for b in blocks]
