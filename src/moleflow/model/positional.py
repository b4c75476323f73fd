"""2-D sinusoidal positional encoding of the patch grid ("spatially aware" flow).

The first half of the encoding channels encodes the row (y), the second half the column (x); each
half is the usual transformer encoding of an integer position p:
    [sin(p ω_0), cos(p ω_0), sin(p ω_1), cos(p ω_1), ...],  ω_i = 10000^(−2i / d).
The encoding is deterministic, so it is cached per grid and never stored in a checkpoint.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

PosMode = Literal["add", "concat", "none"]


def sinusoidal_encoding_1d(length: int, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(length, dim) encoding of the positions 0 .. length-1."""
    if dim <= 0:
        return torch.zeros(length, 0, dtype=dtype)
    pos = torch.arange(length, dtype=torch.float64)[:, None]  # (L, 1)
    n_freq = (dim + 1) // 2
    omega = torch.exp(-math.log(10000.0) * (2.0 * torch.arange(n_freq, dtype=torch.float64) / dim))  # (F,)
    angles = pos * omega  # (L, F)
    enc = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).reshape(length, 2 * n_freq)
    return enc[:, :dim].to(dtype)


def sinusoidal_encoding_2d(height: int, width: int, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(H, W, dim): channels [0, dim//2) encode the row, [dim//2, dim) the column."""
    dim_y = dim // 2
    dim_x = dim - dim_y
    ey = sinusoidal_encoding_1d(height, dim_y, dtype)[:, None, :].expand(height, width, dim_y)
    ex = sinusoidal_encoding_1d(width, dim_x, dtype)[None, :, :].expand(height, width, dim_x)
    return torch.cat([ey, ex], dim=-1).contiguous()


class PositionalEncoding(nn.Module):
    """"add": x + PE (dim = C); "concat": [x, PE] with `dim` extra channels; "none": x unchanged."""

    def __init__(self, mode: PosMode, channels: int, dim: int) -> None:
        super().__init__()
        if mode not in ("add", "concat", "none"):
            raise ValueError(f"model.pos_encoding must be one of add, concat, none; got {mode!r}")
        if mode == "concat" and dim < 1:
            raise ValueError(f"model.pos_encoding_dim must be >= 1 in concat mode, got {dim}")
        self.mode = mode
        self.channels = channels
        self.dim = channels if mode == "add" else (dim if mode == "concat" else 0)
        self.out_channels = channels + (self.dim if mode == "concat" else 0)
        self._cache: dict[tuple, torch.Tensor] = {}

    def encoding(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (height, width, str(device), dtype)
        enc = self._cache.get(key)
        if enc is None:
            enc = sinusoidal_encoding_2d(height, width, self.dim, dtype).to(device)
            self._cache[key] = enc
        return enc

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, out_channels)
        if self.mode == "none":
            return x
        b, h, w, _ = x.shape
        pe = self.encoding(h, w, x.device, x.dtype)  # (H, W, dim)
        if self.mode == "add":
            return x + pe
        return torch.cat([x, pe.expand(b, h, w, self.dim)], dim=-1)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, channels={self.channels}, dim={self.dim}"
