"""Scores: per-patch NLL → anomaly map (upsampled, Gaussian-blurred) → image score.

The blur matches scipy.ndimage.gaussian_filter (the usual post-processing in the anomaly-detection
literature): a normalised Gaussian of radius ⌈4σ⌉ and half-sample symmetric borders
("d c b a | a b c d", scipy's default mode "reflect"), so a constant map stays constant.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
