"""A task's patch memory: a coreset of its training patches, and each patch's distance to the nearest one.

    x (B, H, W, C) ──distance──► d (B, H, W): Euclidean distance to the nearest memory patch

This is PatchCore's score (Roth et al. 2022: k-centre greedy coreset of the training patches, nearest
neighbour) kept per task, next to the flow: over the same features it localizes better than the flow does
(docs/localization.md), and a task's memory holds only its own training patches, so it keeps complete
separation (no task reads or changes another's). `scale` holds the medians over the task's training
patches of the flow's ‖z‖ and of d, so the blend adds two scores of the same unit; `weight` is the
task's own blend weight, chosen on synthetic defects of its training images (continual/blend_weight.py).
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

NO_WEIGHT = -1.0  # PatchMemory.weight when the task chose no blend weight (weights lie in [0, 1])


def scale_sample(n: int, size: int = 32) -> torch.Tensor:
    """Indices of (up to `size` of) n training images, evenly spread: the images whose patches set a
    task's score scales (the memory's medians, the map's colour floor)."""
    return torch.linspace(0, n - 1, min(size, n)).long()


def greedy_coreset(bank: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Indices (size,) of a k-centre greedy coreset of the rows of `bank` (N, C): starting from a seeded
    random row, repeatedly keep the row farthest from those kept (PatchCore's selection)."""
    if not 1 <= size <= len(bank):
        raise ValueError(f"greedy_coreset: size must lie in [1, {len(bank)}], got {size}")
    first = int(torch.randint(len(bank), (1,), generator=torch.Generator().manual_seed(seed)))
    sq = bank.pow(2).sum(1)  # (N,): squared distances as ‖b‖² − 2 b·c + ‖c‖², one mat-vec per step
    dist = sq - 2 * (bank @ bank[first]) + sq[first]  # brackets: `2 * bank` would copy the bank
    kept = torch.empty(size, dtype=torch.long, device=bank.device)
    kept[0] = first
    for i in range(1, size):
        j = dist.argmax()
        kept[i] = j
        dist = torch.minimum(dist, sq - 2 * (bank @ bank[j]) + sq[j])
    return kept


class PatchMemory(nn.Module):
    """Memory patches (M, C) and the scales (flow ‖z‖ median, distance median) of one task."""

    def __init__(self, channels: int, size: int = 0) -> None:
        super().__init__()
        self.register_buffer("bank", torch.zeros(size, channels))  # (M, C)
        self.register_buffer("scale", torch.ones(2))  # (flow ‖z‖, nearest distance) medians over training patches
        # the task's memory weight in the blend; NO_WEIGHT: none chosen (scoring.memory_weight applies).
        # Not NaN: NaN ≠ NaN, and a task's tensors must compare bitwise equal to themselves. Task files
        # written before it existed load without it (MoLEFlow.load_task_state_dict).
        self.register_buffer("weight", torch.tensor(NO_WEIGHT))

    def resize(self, size: int) -> None:
        """Make room for `size` memory patches (before loading a saved task's bank)."""
        self.bank = self.bank.new_zeros(size, self.bank.shape[1])

    def distance(self, x: torch.Tensor, rows: int = 1024) -> torch.Tensor:
        """x (B, H, W, C) -> (B, H, W): distance of each patch to its nearest memory patch."""
        if self.bank.shape[0] == 0:
            raise RuntimeError("the patch memory is empty: the task was not trained with a memory")
        b, h, w, c = x.shape
        flat = x.reshape(b * h * w, c)
        bank_sq = self.bank.pow(2).sum(1)[None]  # (1, M)
        # Tracing (the ONNX export) unrolls a Python loop to the example batch's block count and drops
        # the rest of a larger batch (images 3+ scored 0); the scripted loop stays a loop in the graph.
        nearest = _nearest_sq_scripted() if torch.jit.is_tracing() else _nearest_sq
        d2 = nearest(flat, self.bank, bank_sq, rows)
        return d2.clamp_min(0).sqrt().reshape(b, h, w)


def _nearest_sq(flat: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor, rows: int) -> torch.Tensor:
    """Queries (P, C), memory (M, C) and its squared norms (1, M) -> (P,) squared distance to the nearest.

    Blocks of query patches keep the (rows, M) product in cache: 2.5× faster than one (P, M) block with
    separate temporaries (predict's flow stage, docs/localization.md); ‖q‖² is added after the min since
    it does not change which memory patch is nearest."""
    d2 = flat.new_empty(flat.shape[0])
    for s in range(0, flat.shape[0], rows):
        q = flat[s : s + rows]
        near = torch.addmm(bank_sq, q, bank.T, alpha=-2.0).min(dim=1).values  # min ‖m‖² − 2 q·m
        d2[s : s + rows] = near + q.pow(2).sum(1)
    return d2


@functools.cache
def _nearest_sq_scripted() -> torch.jit.ScriptFunction:
    """`_nearest_sq` compiled by TorchScript (for the export's trace), once, when first exported."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice; the exporter is TorchScript's
        return torch.jit.script(_nearest_sq)
