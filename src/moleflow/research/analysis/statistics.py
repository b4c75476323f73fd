"""The statistics behind the measurements: inequality of loss weights, separation of two samples, where
patches lie on the grid, Gaussianity of latents, the loss weight of each patch. Pure functions of arrays
(no runs, no files), each with a known answer tested in tests/test_analysis.py."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage, stats

from moleflow.config import LossConfig
from moleflow.model.loss import tail_aware_loss, tail_count

# Patch subsample sizes of the statistics (keeps scipy and the cosine matrices cheap).
MAX_STAT_PATCHES = 4000
MAX_QQ_VALUES = 100_000
MAX_NORMALITY_PATCHES = 1000
MAX_PIXELS = 200_000
MAX_TAIL_FOR_NEAREST = 2000
DEFECT_CELL_FRACTION = 0.5  # a patch is "defective" when at least this fraction of its cell is in the mask
CALIBRATION_QUANTILES = (0.99, 0.999)


def gini(values: np.ndarray | torch.Tensor) -> float:
    """Gini coefficient of non-negative magnitudes (absolute values are taken): 0 = all equal,
    1 − 1/n = everything on one of n items. Mean absolute difference / (2·mean)."""
    x = np.sort(np.abs(np.asarray(values, dtype=np.float64).reshape(-1)))
    n = x.size
    if n == 0:
        raise ValueError("gini of an empty array")
    total = x.sum()
    if total == 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float(2.0 * np.sum(ranks * x) / (n * total) - (n + 1) / n)


def loss_weight_gini_exact(tail_weight: float, tail_ratio: float, n_patches: int) -> float:
    """Gini of the per-patch loss weights ∂L/∂n of L = (1−w)·mean(n) + w·mean(top K of n), K = ⌈ρN⌉.

    The top K get (1−w)/N + w/K, the others (1−w)/N; their sum is 1 (mean 1/N), and the pairwise
    differences are w/K for the K·(N−K) mixed pairs, so Gini = Σ|xi−xj| / (2N²·mean) = w·(1 − K/N).
    """
    k = tail_count(n_patches, tail_ratio)
    return float(tail_weight * (1.0 - k / n_patches))


def effective_count(weights: np.ndarray | torch.Tensor) -> float:
    """exp(entropy) of the normalised magnitudes: how many patches effectively carry the gradient."""
    p = np.abs(np.asarray(weights, dtype=np.float64).reshape(-1))
    p = p[p > 0] / p.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def fisher_ratio(positive: np.ndarray, negative: np.ndarray) -> float:
    """(μ1 − μ0)² / (σ1² + σ0²): separation of two score samples, scale-free."""
    a, b = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    denom = a.var() + b.var()
    if denom == 0:
        return math.inf if a.mean() != b.mean() else 0.0
    return float((a.mean() - b.mean()) ** 2 / denom)


def histogram_overlap(a: np.ndarray, b: np.ndarray, bins: int = 100) -> float:
    """Intersection Σ min(p, q) of the two normalised histograms on common bins: 1 = same, 0 = disjoint."""
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    if hi <= lo:
        return 1.0
    edges = np.linspace(lo, hi, bins + 1)
    p = np.histogram(a, edges)[0] / a.size
    q = np.histogram(b, edges)[0] / b.size
    return float(np.minimum(p, q).sum())


def border_distance(h: int, w: int) -> np.ndarray:
    """(H, W) distance of each grid cell to the nearest image border, in patches (0 = outermost ring)."""
    i = np.arange(h)[:, None]
    j = np.arange(w)[None, :]
    return np.minimum(np.minimum(i, h - 1 - i), np.minimum(j, w - 1 - j))


def border_ks(tail_distances: np.ndarray, all_distances: np.ndarray) -> tuple[float, float]:
    """Two-sample KS of the tail patches' border distances against those of all patches (statistic, p).

    Uniform positions on the grid give exactly the all-patches distribution of border distances, so
    this tests "tail positions are uniform over the grid" as far as the border distance can tell.
    """
    res = stats.ks_2samp(np.asarray(tail_distances, np.float64), np.asarray(all_distances, np.float64))
    return float(res.statistic), float(res.pvalue)


def gradient_cells(image: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """Image (3, S, S) in [0, 1] -> (H, W) mean Sobel gradient magnitude of the grey image per patch cell."""
    grey = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]).double().numpy()  # (S, S)
    mag = np.hypot(ndimage.sobel(grey, axis=0), ndimage.sobel(grey, axis=1))  # (S, S)
    cells = F.adaptive_avg_pool2d(torch.from_numpy(mag)[None, None], grid)  # (1, 1, H, W)
    return cells[0, 0].numpy()


def latent_calibration(z: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    """Gaussianity of latent vectors z (n, C) that should follow N(0, I)."""
    z = np.asarray(z, np.float64)
    n, c = z.shape
    flat = z.reshape(-1)
    if flat.size > MAX_QQ_VALUES:
        flat = rng.choice(flat, MAX_QQ_VALUES, replace=False)
    (_, _), (slope, intercept, r) = stats.probplot(flat, dist="norm")
    out: dict[str, Any] = {"n_patches": n, "channels": c, "qq_r": float(r), "qq_slope": float(slope),
                           "qq_intercept": float(intercept), "z_mean": float(flat.mean()), "z_std": float(flat.std()),
                           "sq_norm_per_dim": float((z**2).sum(1).mean() / c)}
    for p in CALIBRATION_QUANTILES:
        out[f"q_err_{p}"] = float(abs(np.quantile(flat, p) - stats.norm.ppf(p)))
        out[f"q_err_{1 - p:.3g}"] = float(abs(np.quantile(flat, 1 - p) - stats.norm.ppf(1 - p)))
    if n >= 20:  # normaltest needs a few dozen samples to mean anything
        # On MAX_NORMALITY_PATCHES patches (the notes' 1000): with many more every channel "fails".
        zn = z if n <= MAX_NORMALITY_PATCHES else z[rng.choice(n, MAX_NORMALITY_PATCHES, replace=False)]
        pvals = np.asarray(stats.normaltest(zn, axis=0).pvalue, np.float64)  # (C,)
        out["normal_frac_p_gt_0.05"] = float(np.mean(pvals > 0.05))
        out["normal_median_p"] = float(np.median(pvals))
    else:
        out["normal_frac_p_gt_0.05"] = out["normal_median_p"] = None
    return out


def loss_patch_weights(z: torch.Tensor, log_det: torch.Tensor, loss_cfg: LossConfig) -> torch.Tensor:
    """∂L/∂n per patch (B, H, W): the weight each patch NLL gets in the training loss, by autograd.

    The NLL part of the real loss is used (tail_aware_loss with its regularisers switched off: they are
    not functions of n). Since n = (½‖z‖² − log_det)/C, ∂L/∂n = −C·∂L/∂log_det.
    """
    cfg = dataclasses.replace(loss_cfg, lambda_logdet=0.0, center_weight=0.0, whitening_reg=0.0)
    ld = log_det.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss, _ = tail_aware_loss(z.detach(), ld, cfg)
        (grad,) = torch.autograd.grad(loss, ld)
    return -grad * z.shape[-1]


def subsample_rows(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """At most k rows of x, drawn without replacement (x itself when it has no more)."""
    return x if len(x) <= k else x[rng.choice(len(x), k, replace=False)]


def cell_fractions(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, 1, S, S) bool masks -> (N, H, W) fraction of each patch cell inside the mask."""
    return F.adaptive_avg_pool2d(masks.float(), grid)[:, 0]


def tail_mask(nll: torch.Tensor, ratio: float, scope: str) -> torch.Tensor:
    """(N, H, W) bool: the top ⌈ρ·count⌉ NLL patches over all analysed images (scope batch) or per image."""
    if scope == "image":
        flat = nll.reshape(nll.shape[0], -1)
        idx = flat.topk(tail_count(flat.shape[1], ratio), dim=1).indices
        out = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)
        return out.reshape(nll.shape)
    flat = nll.reshape(-1)
    out = torch.zeros_like(flat, dtype=torch.bool)
    out[flat.topk(tail_count(flat.numel(), ratio)).indices] = True
    return out.reshape(nll.shape)
