"""LoRALinear: one shared linear layer plus per-task low-rank experts and task biases.

    y = x Wᵀ + b + b_t + (alpha / rank) · (x A_tᵀ) B_tᵀ

`W`, `b` are shared (trained with task 0, frozen afterwards). Task t owns `lora_A[t]` (rank, in),
Xavier-initialised, `lora_B[t]` (out, rank) and `task_bias[t]` (out), both zero-initialised, so a
freshly added task computes exactly the shared layer. Per-task tensors live in ParameterDicts keyed
by `str(t)` (the key is also their state-dict suffix, which is how checkpoints split them per task).

The task in use is explicit: `active_task` is set by `MoLEFlow.use_task(t)` on every layer. Calling a
layer that has tasks but no active task is an error; a silent fallback to the shared weights would
hide routing bugs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """A linear layer over the last dimension with shared weights and per-task LoRA experts."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        use_lora: bool = True,
        use_task_bias: bool = True,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRALinear: rank must be >= 1, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.scaling = alpha / rank  # v2 of the notes: alpha / rank (v1 used alpha / (2 rank))
        self.use_lora = use_lora
        self.use_task_bias = use_task_bias
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.task_bias = nn.ParameterDict()
        # Task keys in insertion order; kept separately because with use_lora=False and
        # use_task_bias=False a task owns no tensors here but must still be a known task.
        self.task_keys: list[str] = []
        self.active_task: str | None = None
        # Inference only: task key -> (versions of the tensors it was merged from, W_t, b_t).
        self._merged: dict[str, tuple[tuple[tuple[int, int], ...], torch.Tensor, torch.Tensor]] = {}
        self.reset_shared_parameters()

    def reset_shared_parameters(self) -> None:
        """nn.Linear's default initialisation of the shared weight and bias."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        nn.init.uniform_(self.bias, -bound, bound)

    def add_task(self, key: str) -> None:
        if key in self.task_keys:
            raise ValueError(f"LoRALinear: task '{key}' already exists")
        dev, dt = self.weight.device, self.weight.dtype
        if self.use_lora:
            a = torch.empty(self.rank, self.in_features, device=dev, dtype=dt)
            nn.init.xavier_uniform_(a)
            self.lora_A[key] = nn.Parameter(a)
            self.lora_B[key] = nn.Parameter(torch.zeros(self.out_features, self.rank, device=dev, dtype=dt))
        if self.use_task_bias:
            self.task_bias[key] = nn.Parameter(torch.zeros(self.out_features, device=dev, dtype=dt))
        self.task_keys.append(key)

    def remove_task(self, key: str) -> None:
        if key not in self.task_keys:
            raise KeyError(f"LoRALinear: no task '{key}' (tasks: {self.task_keys})")
        for d in (self.lora_A, self.lora_B, self.task_bias):
            if key in d:
                del d[key]
        self.task_keys.remove(key)
        self._merged.pop(key, None)
        if self.active_task == key:
            self.active_task = None

    def task_parameters(self, key: str) -> list[nn.Parameter]:
        """Exactly the tensors owned by task `key` in this layer."""
        return [d[key] for d in (self.lora_A, self.lora_B, self.task_bias) if key in d]

    def effective_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W + s·B_t A_t, b + b_t) for the active task; (W, b) when the layer has no tasks."""
        if not self.task_keys:
            return self.weight, self.bias
        key = self.active_task
        if key is None:
            raise RuntimeError(
                "LoRALinear called without an active task; wrap the call in `with model.use_task(t):` "
                f"(known tasks: {self.task_keys})"
            )
        if key not in self.task_keys:
            raise KeyError(f"LoRALinear: active task '{key}' does not exist (known tasks: {self.task_keys})")
        inference = not torch.is_grad_enabled()
        # Storage and version of every source tensor: a device move, a load or an optimiser step all change one.
        versions = tuple((t.data_ptr(), t._version) for t in (self.weight, self.bias, *self.task_parameters(key)))
        cached = self._merged.get(key) if inference else None
        if cached is not None and cached[0] == versions:
            return cached[1], cached[2]  # the task's merged weights, unchanged since they were merged
        w, b = self.weight, self.bias
        if self.use_lora:
            # Merging the rank-r update into W costs out·in·r once instead of N·r·(in+out) for N patch
            # vectors (N is in the thousands), and with B_t = 0 it is exactly W.
            w = w + self.scaling * (self.lora_B[key] @ self.lora_A[key])
        if self.use_task_bias:
            b = b + self.task_bias[key]
        if inference:  # kept until any of its tensors changes (an optimiser step or a load bumps _version)
            self._merged[key] = (versions, w, b)
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        w, b = self.effective_weight_and_bias()
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"scaling={self.scaling:g}, use_lora={self.use_lora}, use_task_bias={self.use_task_bias}, "
            f"tasks={self.task_keys}"
        )
