"""Adapters around the base flow: WhiteningAdapter (per task), SpatialMixer (shared), DIA (per task).

All act on channels-last tensors (B, H, W, C).

- WhiteningAdapter and SpatialMixer prepare the flow's input; they are not part of the density.
- DIA (Deep Invertible Adapter) is a small per-task flow applied after the base flow; its per-patch
  log-det adds to the base flow's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moleflow.model.flow import chain_forward, chain_inverse, soft_clamp

# Task 0's whitening starts here: gamma = 0.5 + 1.5·sigmoid(-0.7) ≈ 0.998, i.e. near identity (V3-1).
TASK0_GAMMA_RAW = -0.7


class WhiteningAdapter(nn.Module):
    """y = γ ⊙ LayerNorm_noaffine(x) + β, γ = γmin + (γmax − γmin)·sigmoid(γ_raw), β = βmax·tanh(β_raw).

    Task 0 starts near identity (γ ≈ 1, β = 0) and is pulled there by `identity_regularization()`;
    later tasks start at the midpoint of the γ range (γ_raw = 0) with β = 0.
    """

    def __init__(self, channels: int, task_index: int, gamma_min: float, gamma_max: float, beta_max: float) -> None:
        super().__init__()
        if not 0 < gamma_min < gamma_max:
            raise ValueError(f"WhiteningAdapter: need 0 < gamma_min < gamma_max, got {gamma_min}, {gamma_max}")
        self.channels = channels
        self.task_index = task_index
        self.gamma_min = gamma_min
        self.gamma_max = gamma_max
        self.beta_max = beta_max
        init = TASK0_GAMMA_RAW if task_index == 0 else 0.0
        self.gamma_raw = nn.Parameter(torch.full((channels,), init))
        self.beta_raw = nn.Parameter(torch.zeros(channels))

    @property
    def gamma(self) -> torch.Tensor:  # (C,)
        return self.gamma_min + (self.gamma_max - self.gamma_min) * torch.sigmoid(self.gamma_raw)

    @property
    def beta(self) -> torch.Tensor:  # (C,)
        return self.beta_max * torch.tanh(self.beta_raw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        return self.gamma * F.layer_norm(x, (self.channels,)) + self.beta

    def identity_regularization(self) -> torch.Tensor:
        """mean (γ − 1)² + mean β² (unweighted; the loss applies LossConfig.whitening_reg)."""
        return ((self.gamma - 1.0) ** 2).mean() + (self.beta**2).mean()


class StatsWhitening(nn.Module):
    """u = (x − μ_t) · Wᵀ with μ_t and W fixed from task t's own training patches; log|det W| counts.

    `mode` "channel": W = diag(1 / σ) per channel; "full": W = Σ^(−1/2) (ZCA), so the flow's input is
    decorrelated too. Σ is shrunk towards its mean variance (`eps` of it) so that channels that are almost
    constant on this product (a black background gives many) are not blown up into noise.

    Unlike the LayerNorm adapter it keeps each patch's own mean and scale (a dark, flat patch stays
    distinct from a textured one), it is an invertible affine map of the features, and it gives every
    task's input to the shared flow the same first two moments, whatever the product. Its log-det is a
    constant per task, added to the flow's so that scores stay the NLL of the features themselves.
    The statistics are buffers: they belong to the task, are saved with it, and are never trained.
    """

    def __init__(self, channels: int, mode: str, eps: float) -> None:
        super().__init__()
        if mode not in ("channel", "full"):
            raise ValueError(f"StatsWhitening: mode must be 'channel' or 'full', got {mode!r}")
        if eps <= 0:
            raise ValueError(f"StatsWhitening: eps must be > 0, got {eps}")
        self.channels = channels
        self.mode = mode
        self.eps = eps
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("matrix", torch.eye(channels))  # (C_out, C_in); diagonal in "channel" mode
        self.register_buffer("log_det", torch.zeros(()))

    @torch.no_grad()
    def fit(self, patches: torch.Tensor, chunk: int = 64) -> None:
        """Mean and (shrunk) covariance of patches (N, H, W, C), accumulated in float64 by image chunks."""
        c = self.channels
        if patches.shape[-1] != c:
            raise ValueError(f"StatsWhitening.fit: expected (N, H, W, {c}) patches, got {tuple(patches.shape)}")
        total, s1, s2 = 0, torch.zeros(c, dtype=torch.float64), torch.zeros(c, c, dtype=torch.float64)
        for start in range(0, patches.shape[0], chunk):
            x = patches[start : start + chunk].reshape(-1, c).to(device="cpu", dtype=torch.float64)  # (n, C)
            total += x.shape[0]
            s1 += x.sum(0)
            s2 += x.T @ x
        if total < 2:
            raise ValueError("StatsWhitening.fit: need at least 2 patches")
        mean = s1 / total
        cov = (s2 - total * torch.outer(mean, mean)) / (total - 1)  # (C, C)
        floor = self.eps * float(torch.diagonal(cov).mean().clamp_min(1e-12))
        if self.mode == "channel":
            var = torch.diagonal(cov) + floor
            matrix = torch.diag(var.rsqrt())
            log_det = -0.5 * var.log().sum()
        else:
            evals, evecs = torch.linalg.eigh(cov + floor * torch.eye(c, dtype=torch.float64))
            evals = evals.clamp_min(floor)
            matrix = evecs @ torch.diag(evals.rsqrt()) @ evecs.T  # symmetric Σ^(−1/2)
            log_det = -0.5 * evals.log().sum()
        self.mean.copy_(mean.to(self.mean.dtype))
        self.matrix.copy_(matrix.to(self.matrix.dtype))
        self.log_det.copy_(log_det.to(self.log_det.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        return (x - self.mean) @ self.matrix.T

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        """x from u: solves W (x − μ) = u (for tests and analysis, not on the scoring path)."""
        flat = u.reshape(-1, self.channels).T  # (C, B·H·W)
        return torch.linalg.solve(self.matrix, flat).T.reshape(u.shape) + self.mean


class SpatialMixer(nn.Module):
    """y = x + g·(conv(x) − x): a 3×3 depthwise conv over the patch grid, blended in by a gate.

    g = sigmoid(θ) starts at `init_gate` (0.1). The conv starts as the 3×3 mean filter with zero bias,
    so the fresh mixer is a mild neighbourhood smoothing; borders are padded by replication so that a
    constant map stays constant (zero padding would shrink border patches towards 0).
    Shared by all tasks, trained in task 0 only (V4).
    """

    def __init__(self, channels: int, kernel_size: int = 3, init_gate: float = 0.1) -> None:
        super().__init__()
        self.channels = channels
        self.kernel_size = kernel_size
        self.conv = nn.Conv2d(channels, channels, kernel_size, groups=channels)  # padding done in forward
        with torch.no_grad():
            self.conv.weight.fill_(1.0 / (kernel_size * kernel_size))
            self.conv.bias.zero_()
        self.gate_logit = nn.Parameter(torch.tensor(math.log(init_gate / (1.0 - init_gate))))

    @property
    def gate(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        p = self.kernel_size // 2
        xc = F.pad(x.permute(0, 3, 1, 2), (p, p, p, p), mode="replicate")  # (B, C, H+2p, W+2p)
        mixed = self.conv(xc).permute(0, 2, 3, 1)  # (B, H, W, C)
        return x + self.gate * (mixed - x)


class DIACouplingBlock(nn.Module):
    """Affine coupling with a Linear-ReLU-Linear-ReLU-Linear subnet whose last layer starts at zero.

    `flip=False` transforms the second half conditioned on the first, `flip=True` the reverse.
    One subnet produces both s and t (the notes use two nets of the same shape).
    """

    def __init__(self, channels: int, hidden: int, clamp: float, flip: bool) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"a DIA coupling block needs at least 2 channels, got {channels}")
        self.channels = channels
        self.split = channels // 2
        self.flip = flip
        self.clamp = clamp
        n_cond = channels - self.split if flip else self.split
        self.n_trans = channels - n_cond
        self.net = nn.Sequential(
            nn.Linear(n_cond, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 2 * self.n_trans),
        )
        nn.init.zeros_(self.net[4].weight)  # identity at start: s = t = 0
        nn.init.zeros_(self.net[4].bias)

    def _halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first, second = x[..., : self.split], x[..., self.split :]
        return (second, first) if self.flip else (first, second)  # (conditioning, transformed)

    def _join(self, cond: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
        return torch.cat([trans, cond] if self.flip else [cond, trans], dim=-1)

    def _scale_shift(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(cond)
        return soft_clamp(out[..., : self.n_trans], self.clamp), out[..., self.n_trans :]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond, trans = self._halves(x)
        s, t = self._scale_shift(cond)
        return self._join(cond, trans * torch.exp(s) + t), s.sum(dim=-1)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond, trans = self._halves(y)
        s, t = self._scale_shift(cond)
        return self._join(cond, (trans - t) * torch.exp(-s)), -s.sum(dim=-1)


class DIA(nn.Module):
    """Deep Invertible Adapter: `n_blocks` coupling blocks alternating halves, identity at start."""

    def __init__(self, channels: int, n_blocks: int, hidden_ratio: float, clamp: float) -> None:
        super().__init__()
        hidden = max(1, int(channels * hidden_ratio))
        self.blocks = nn.ModuleList(DIACouplingBlock(channels, hidden, clamp, flip=i % 2 == 1) for i in range(n_blocks))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, C) -> (z, log_det (B, H, W))."""
        return chain_forward(self.blocks, x)

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return chain_inverse(self.blocks, z)
