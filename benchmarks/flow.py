"""Throughput and size of the MoLE-Flow model on the CPU.

    python benchmarks/flow.py [--threads 2] [--steps 10] [--batch 8]

Prints, for the default dimensions (C = 152 channels on a 32×32 grid: the offline EfficientNet-Lite0
layers [2, 3] at 256 px, default ModelConfig) and a smaller C = 64 variant:
- training patch vectors per second (forward + tail-aware loss + backward + AdamW step), for task 0
  (shared part trainable) and task 1 (its adapters only);
- inference patch vectors per second (no_grad forward);
- parameters: shared, and added per task.
Then the per-task parameter count of the paper's configuration (WideResNet-50-2 features projected to
768 or 512 channels, 8 coupling blocks, LoRA rank 64, 4 DIA blocks), computed without running it.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from moleflow.config import LossConfig, ModelConfig
from moleflow.model.loss import tail_aware_loss
from moleflow.model.mole_flow import MoLEFlow


def train_rate(model: MoLEFlow, task: int, x: torch.Tensor, steps: int, loss_cfg: LossConfig) -> float:
    params = model.set_trainable(task)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    model.train()

    def step() -> None:
        z, log_det = model(x)
        loss, _ = tail_aware_loss(z, log_det, loss_cfg, reg=model.regularization(task))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    with model.use_task(task):
        step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        dt = time.perf_counter() - t0
    return steps * x.shape[0] * x.shape[1] * x.shape[2] / dt


def infer_rate(model: MoLEFlow, task: int, x: torch.Tensor, steps: int) -> float:
    model.eval()
    with torch.no_grad(), model.use_task(task):
        model(x)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x)
        dt = time.perf_counter() - t0
    return steps * x.shape[0] * x.shape[1] * x.shape[2] / dt


def sizes(cfg: ModelConfig, channels: int) -> tuple[int, int]:
    model = MoLEFlow(cfg, channels)
    model.add_task(0)
    model.add_task(1)
    return model.shared_parameter_count(), model.task_parameter_count(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--grid", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = ModelConfig()
    loss_cfg = LossConfig()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, grid {args.grid}x{args.grid}")
    print(f"{'setup':<28}{'train t0':>12}{'train t1':>12}{'infer':>12}{'shared':>12}{'per task':>12}")
    for name, channels in [("default C=152", 152), ("small C=64", 64)]:
        model = MoLEFlow(base, channels)
        model.add_task(0)
        model.add_task(1)
        x = torch.randn(args.batch, args.grid, args.grid, channels)
        r0 = train_rate(model, 0, x, args.steps, loss_cfg)
        r1 = train_rate(model, 1, x, args.steps, loss_cfg)
        ri = infer_rate(model, 0, x, args.steps)
        print(
            f"{name:<28}{r0:>12,.0f}{r1:>12,.0f}{ri:>12,.0f}"
            f"{model.shared_parameter_count():>12,}{model.task_parameter_count(1):>12,}"
        )
    print("(rates in patch vectors / second; one 256 px image = 1024 patch vectors)")
    print()
    paper = dataclasses.replace(base, coupling_blocks=8, lora_rank=64, dia_blocks=4)
    print("paper configuration (8 blocks, LoRA rank 64, 4 DIA blocks); published system: 2.27 M per task")
    for channels in (768, 512):
        shared, per_task = sizes(paper, channels)
        lora_only = sizes(dataclasses.replace(paper, dia_blocks=0, whitening=False), channels)[1]
        print(
            f"  C={channels}: shared {shared / 1e6:.2f} M, per task {per_task / 1e6:.2f} M "
            f"(LoRA + task biases {lora_only / 1e6:.2f} M, DIA + whitening {(per_task - lora_only) / 1e6:.2f} M)"
        )


if __name__ == "__main__":
    main()
