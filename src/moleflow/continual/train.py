"""Training one task on cached features (METHOD.md §3).

The backbone is frozen and its features are cached, so an epoch is a pass of the flow over stored
(N, H, W, C) tensors. Only the parameters `model.set_trainable(t)` returns are optimised; with complete
separation that means task t's own modules (plus the shared ones for task 0).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from moleflow.config import LossConfig, TrainConfig
from moleflow.features.cache import FeatureSet
from moleflow.continual.ogp import GradientMemory
from moleflow.model.loss import tail_aware_loss
from moleflow.model.mole_flow import MoLEFlow


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN or infinite loss); the model was restored to its state before the task."""


@dataclass
class TrainLog:
    task: int
    epoch_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    grad_norms: list[dict[str, float]] = field(default_factory=list)  # per epoch (mean over its steps), when recorded


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)


def _schedule(cfg: TrainConfig, total_steps: int, steps_per_epoch: int):
    warmup = cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def block_grad_norms(model: MoLEFlow) -> dict[str, float]:
    """Gradient norm of each coupling block of the base flow (for the tail-loss analysis)."""
    out = {}
    for i, block in enumerate(model.flow.blocks):
        sq = sum(float(p.grad.detach().pow(2).sum()) for p in block.parameters() if p.grad is not None)
        out[f"block{i}"] = math.sqrt(sq)
    return out


@dataclass
class _Step:
    """What one optimisation step needs besides the batch."""

    model: MoLEFlow
    task: int
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    train_cfg: TrainConfig
    loss_cfg: LossConfig
    memory: GradientMemory | None


def _optimise(step: _Step, x: torch.Tensor, epoch: int, norms: list[dict[str, float]]) -> torch.Tensor:
    """One AdamW step on the batch x (B, H, W, C); returns the (detached) loss."""
    z, log_det = step.model(x)
    loss, _ = tail_aware_loss(z, log_det, step.loss_cfg, reg=step.model.regularization(step.task))
    if not torch.isfinite(loss):
        raise TrainingError(
            f"task {step.task}, epoch {epoch + 1}: the loss became {float(loss)}; "
            "lower train.lr or raise train.grad_clip's strictness (e.g. train.grad_clip=0.5)"
        )
    step.opt.zero_grad(set_to_none=True)
    loss.backward()
    if step.memory is not None:
        step.memory.project(step.model.named_parameters())
    if step.train_cfg.record_grad_norms:
        norms.append(block_grad_norms(step.model))
    if step.train_cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(step.params, step.train_cfg.grad_clip)
    step.opt.step()
    step.sched.step()
    return loss.detach()


def _epoch(step: _Step, features: FeatureSet, order: torch.Tensor, bs: int, epoch: int, device: torch.device,
           log: TrainLog, bar: tqdm) -> None:
    """One pass over the features in `order`; appends the epoch's mean loss (and grad norms) to `log`."""
    running, count = 0.0, 0
    norms: list[dict[str, float]] = []
    for start in range(0, len(order), bs):
        idx = order[start : start + bs]
        x = features.patches[idx].to(device=device, dtype=torch.float32)  # (B, H, W, C)
        loss = _optimise(step, x, epoch, norms)
        log.steps += 1
        running += float(loss) * len(idx)
        count += len(idx)
        bar.update(1)
        bar.set_postfix(epoch=f"{epoch + 1}/{step.train_cfg.epochs}", loss=f"{running / count:.4f}", refresh=False)
    log.epoch_loss.append(running / count)
    if norms:
        log.grad_norms.append({k: sum(d[k] for d in norms) / len(norms) for k in norms[0]})


def fit_task(
    model: MoLEFlow,
    task: int,
    features: FeatureSet,
    train_cfg: TrainConfig,
    loss_cfg: LossConfig,
    device: torch.device,
    progress: bool = True,
    memory: GradientMemory | None = None,
) -> TrainLog:
    """Train task `task` (already added to the model) on its cached training features.

    `memory` (the finetune baseline with train.ogp) removes earlier tasks' gradient directions from
    every step's gradients. The batch order comes from its own generator, seeded `train.seed · 1000 +
    task` (see `continual/system.py` for the run's seeding rule).
    """
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.fit_statistics(task, features.patches)  # statistics whitening: fixed before training
    params = model.set_trainable(task)
    if not params:
        model.load_state_dict(before)
        raise TrainingError(f"task {task} has no trainable parameters (check the model config)")

    n = len(features)
    bs = min(train_cfg.batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    total = steps_per_epoch * train_cfg.epochs
    opt = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(train_cfg, total, steps_per_epoch))
    step = _Step(model, task, params, opt, sched, train_cfg, loss_cfg, memory)
    gen = torch.Generator().manual_seed(train_cfg.seed * 1000 + task)
    log = TrainLog(task=task)
    t0 = time.perf_counter()
    model.train()
    bar = tqdm(total=total, desc=f"train task {task}", unit="step", disable=not progress, leave=False)
    try:
        with model.use_task(task):
            for epoch in range(train_cfg.epochs):
                _epoch(step, features, torch.randperm(n, generator=gen), bs, epoch, device, log, bar)
                if progress:
                    tqdm.write(f"task {task} epoch {epoch + 1}/{train_cfg.epochs}: loss {log.epoch_loss[-1]:.4f}")
    except BaseException:
        # Leave no half-trained model behind: every tensor goes back to its value before this task.
        model.load_state_dict(before)
        raise
    finally:
        bar.close()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    log.seconds = time.perf_counter() - t0
    return log
