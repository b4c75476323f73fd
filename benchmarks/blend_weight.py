"""Does each task's synthetic choice of its memory weight rank the weights as its real defects do?

    .venv/bin/python benchmarks/blend_weight.py MODEL_DIR [MODEL_DIR ...] [--weights 0,0.5,0.8,0.9,1]
                                                [--category PATH ...] [--cache DIR]

For every task of each saved model (`localization.py --out runs/loc --set output.save_model=true` writes
runs/loc/order0/model, ...), per candidate weight w of the blend (1 − w)·‖z‖ + w·d:
- "synthetic": what `continual/blend_weight.py` measures when the task trains: the mean of pixel AUROC and
  AUPRO on CutPaste defects pasted on (up to 32 of) the task's own training images, seeded as in training;
- "real": pixel AUROC, pixel AP and AUPRO of the same blend on the task's real test set, told the task.
The task's stored choice (`scoring.memory_weights` of the model's config) is printed with them. A saved
model names its class folders relative to the root it was trained on; `--category` gives the folders
(default: the development categories of `localization.py`), linked into one root as there.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

from moleflow.config import config_from_dict
from moleflow.continual.blend_weight import choose_memory_weight
from moleflow.continual.system import calibration_seed, load_system, saved_config, task_features
from moleflow.metrics import aupro, pixel_auroc, pixel_ap
from moleflow.scoring import anomaly_map, blend_parts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from localization import DEFAULT_CATEGORIES, linked_root  # noqa: E402


def real_parts(system, t: int, specs: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task t's test set: (flow part, memory part) (N, H, W) each, and the masks (N, S, S) bool."""
    test = task_features(system, specs, "test", progress=False)
    flow, near = [], []
    with torch.no_grad(), system.model.use_task(t):
        for s in range(0, len(test), 16):
            f, n = blend_parts(system.model, test.patches[s:s + 16].float().to(system.device))
            flow.append(f.cpu())
            near.append(n.cpu())
    return torch.cat(flow), torch.cat(near), test.masks[:, 0].bool()


def task_rows(model_dir: Path, root: Path, weights: list[float], cache: str) -> list[str]:
    tree = saved_config(model_dir)
    tree["data"]["root"] = str(root)
    tree["backbone"]["cache_dir"] = cache
    system = load_system(model_dir, config_from_dict(tree))
    cfg = system.cfg
    lines = []
    for record in system.tasks:
        t, specs = record.index, record.specs
        with system.model.use_task(t):
            stored = system.model.memory_weight()
        paths = task_features(system, specs, "train", progress=False).paths  # as the task trained on them
        choice = choose_memory_weight(system.model, system.extractor, t, paths, cfg.data.image_size,
                                      dataclasses.replace(cfg.scoring, memory_weights=weights),
                                      seed=calibration_seed(cfg, t))  # the seed training used
        flow, near, truth = real_parts(system, t, specs)
        for i, w in enumerate(weights):
            maps = anomaly_map((1 - w) * flow + w * near, cfg.data.image_size, cfg.scoring.blur_sigma).numpy()
            real = [f(truth.numpy(), maps) for f in (pixel_auroc, pixel_ap, aupro)]
            mark = " <- stored" if stored is not None and abs(stored - w) < 1e-6 else ""
            lines.append(f"| {model_dir.parent.name} | {t} | {', '.join(record.classes)} | {w:g} | {choice.quality[i]:.4f} | "
                         + " | ".join(f"{v:.4f}" for v in real) + f" |{mark}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path, help="saved model directories")
    ap.add_argument("--weights", default="0,0.5,0.8,0.9,1", help="candidate memory weights, comma-separated")
    ap.add_argument("--category", action="append", default=None, metavar="PATH", help="MVTec-layout class folder (repeatable)")
    ap.add_argument("--cache", default=".cache/features", help="feature cache directory ('' = none)")
    args = ap.parse_args(argv)
    weights = [float(w) for w in args.weights.split(",")]
    print("| run | task | class | w | synthetic (pix AUROC + AUPRO) / 2 | real pix AUROC | real pix AP | real AUPRO |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = linked_root([Path(c) for c in (args.category or DEFAULT_CATEGORIES)], Path(tmp))
        for model_dir in args.models:
            for line in task_rows(model_dir, root, weights, args.cache):
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
