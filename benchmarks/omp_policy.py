"""Training and flow-inference speed under OpenMP wait policies, alone and with two processes at once.

    python benchmarks/omp_policy.py [--images 120]

torch's CPU kernels run on OpenMP threads (libgomp in the pip wheels). Between parallel regions a
thread either spins or sleeps: spinning is faster when the process has the cores to itself and much
slower when another process shares them. The moleflow CLI sets OMP_WAIT_POLICY=PASSIVE; this prints
what that costs and what it saves. Each measurement is a fresh process (the policy is read when
OpenMP starts): one epoch of `fit_task` on random (N, 32, 32, 152) features at the default config,
then flow inference on 16 of them.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

SETTINGS = {
    "OMP_WAIT_POLICY=PASSIVE (CLI default)": {"OMP_WAIT_POLICY": "PASSIVE"},
    "unset (libgomp default spin)": {},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
}

CHILD = r"""
import sys, time, torch
from moleflow.config import load_config
from moleflow.features.cache import FeatureSet
from moleflow.model.mole_flow import MoLEFlow
from moleflow.continual.train import fit_task
n = int(sys.argv[1])
cfg = load_config(None, ["train.epochs=1"])
x = torch.randn(n, 32, 32, 152, generator=torch.Generator().manual_seed(0)).half()  # (N, H, W, C)
fs = FeatureSet(x, torch.randn(n, 10), torch.zeros(n, dtype=torch.long), None, ["a"] * n, ["c"] * n)
model = MoLEFlow(cfg.model, 152); model.add_task(0)
log = fit_task(model, 0, fs, cfg.train, cfg.loss, torch.device("cpu"), progress=False)
model.eval()
with torch.no_grad(), model.use_task(0):
    batch = x[:16].float(); model(batch); t0 = time.perf_counter()
    for _ in range(3):
        model(batch)
    infer = 48 / (time.perf_counter() - t0)
print(f"{log.steps / log.seconds:.3f} {infer:.1f}")
"""


def run(env_extra: dict[str, str], copies: int, images: int) -> list[tuple[float, float]]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_extra)
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(images)], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(copies)]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"child failed with exit code {p.returncode}")
        steps, infer = stdout.split()
        out.append((float(steps), float(infer)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=120, help="training images per epoch (batch 8)")
    args = ap.parse_args()
    print(f"{'setting':<40}{'alone: steps/s, infer img/s':>30}{'two at once: steps/s each':>30}")
    for name, env in SETTINGS.items():
        (alone,) = run(env, 1, args.images)
        pair = run(env, 2, args.images)
        both = " / ".join(f"{s:.2f}" for s, _ in pair)
        print(f"{name:<40}{alone[0]:>18.2f}, {alone[1]:>9.1f}{both:>30}", flush=True)


if __name__ == "__main__":
    main()
