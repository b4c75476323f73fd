"""Training loss: per-patch NLL and the tail-aware loss of the notes.

    n = (½‖z‖² − log|det J|) / C                                   per patch, (B, H, W)
    L = (1 − w)·mean(n) + w·mean(top ρ of n) + λ_logdet·mean((log|det J| / C)²)
        + whitening_reg·reg [+ center_weight·mean ‖z‖²]

The constant ½·log(2π) per dimension is left out (it moves no gradient). The top ρ is taken over
all patches of the batch (tail_scope "batch", the notes) or within each image ("image"); the count
is ⌈ρ·N⌉, at least 1. The log-det regulariser's form is not in the notes; mean((log|det J|/C)²) is
our reading (METHOD.md §3).

Options: v7 focal NLL (focal_gamma > 0) reweights the mean term per patch by (1 − p)^γ with
p = exp(−max(n, 0)); the clamp keeps p ≤ 1 because this per-dimension NLL (without the 2π constant)
can be negative, where the notes' exp(−n) would exceed 1. v5 centre loss: center_weight·mean ‖z‖².
"""
from __future__ import annotations

import math

import torch

from moleflow.config import LossConfig


def patch_nll(z: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
    """Per-patch NLL per dimension: (½‖z‖² − log_det) / C.  z (B, H, W, C), log_det (B, H, W)."""
    _check_shapes(z, log_det)
    return (0.5 * z.pow(2).sum(dim=-1) - log_det) / z.shape[-1]


def tail_count(n_patches: int, ratio: float) -> int:
    """⌈ratio·n⌉ clipped to [1, n]; the epsilon keeps 0.1·30 = 3.0000000000000004 at 3."""
    return max(1, min(n_patches, math.ceil(ratio * n_patches - 1e-9)))


def tail_mean(n: torch.Tensor, ratio: float, scope: str = "batch") -> torch.Tensor:
    """Mean of the top ⌈ratio·N⌉ values of n (B, H, W), over the batch or per image (then averaged)."""
    if scope == "batch":
        flat = n.reshape(-1)
        return flat.topk(tail_count(flat.numel(), ratio)).values.mean()
    if scope == "image":
        per_image = n.reshape(n.shape[0], -1)  # (B, H·W)
        return per_image.topk(tail_count(per_image.shape[1], ratio), dim=1).values.mean()
    raise ValueError(f"loss.tail_scope must be 'batch' or 'image', got {scope!r}")


def tail_aware_loss(
    z: torch.Tensor, log_det: torch.Tensor, cfg: LossConfig, reg: torch.Tensor | float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss and its parts (floats, for logging). `reg`: the model's regularization(t)."""
    n = patch_nll(z, log_det)  # (B, H, W)
    c = z.shape[-1]
    w = cfg.tail_weight
    if cfg.focal_gamma > 0:
        p = torch.exp(-n.clamp(min=0.0))
        mean_term = ((1.0 - p).pow(cfg.focal_gamma) * n).mean()
    else:
        mean_term = n.mean()
    loss = (1.0 - w) * mean_term
    if w > 0:
        tail = tail_mean(n, cfg.tail_ratio, cfg.tail_scope)
        loss = loss + w * tail
    else:
        with torch.no_grad():  # logged only
            tail = tail_mean(n, cfg.tail_ratio, cfg.tail_scope)
    parts = {"nll": float(n.detach().mean()), "nll_tail": float(tail.detach())}
    if cfg.lambda_logdet > 0:
        ld_reg = ((log_det / c) ** 2).mean()
        loss = loss + cfg.lambda_logdet * ld_reg
        parts["logdet_reg"] = float(ld_reg.detach())
    if cfg.center_weight > 0:
        center = z.pow(2).sum(dim=-1).mean()
        loss = loss + cfg.center_weight * center
        parts["center"] = float(center.detach())
    if cfg.whitening_reg > 0 and (torch.is_tensor(reg) or reg != 0.0):
        loss = loss + cfg.whitening_reg * reg
        parts["whitening_reg"] = float(reg.detach()) if torch.is_tensor(reg) else float(reg)
    parts["loss"] = float(loss.detach())
    return loss, parts


def _check_shapes(z: torch.Tensor, log_det: torch.Tensor) -> None:
    if z.dim() != 4 or tuple(log_det.shape) != tuple(z.shape[:-1]):
        raise ValueError(f"expected z (B, H, W, C) and log_det (B, H, W); got {tuple(z.shape)} and {tuple(log_det.shape)}")
