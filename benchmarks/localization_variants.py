"""Quick localization experiments behind docs/localization.md: one model variant, told the task, on cached features.

    .venv/bin/python benchmarks/localization_variants.py knn [KEY=VALUE ...] [--category PATH ...] [--share 0.01 --coreset]
    .venv/bin/python benchmarks/localization_variants.py flow PATH[,PATH...] [KEY=VALUE ...] [--parts]

`knn`: a nearest-neighbour over a random 10 % (`--share`) of the training patches of the very same features,
or over PatchCore's greedy coreset of them (`--coreset`) (the question "is the information in the
features?"): per-patch distance, the same map (bilinear, blur σ 4), image score = mean of the top 50 patches.
`flow`: learns the given categories in order as tasks 0, 1, ... of one model (complete separation, the
training code of `moleflow fit`), scores each task's test set under its own task (no routing: this isolates
the density model from the router), and prints the four metrics per task. `--post` also scores the same patch scores under other map blurs and image-score
aggregations. `--parts` also scores each
task by ½‖z‖² alone, by −log|det J| alone and, with statistics whitening, by the whitened features' ½‖u‖²
alone (a Gaussian of the task's patches: the flow's starting point).
Features come from the default backbone through moleflow's disk cache (`--cache`), so repeated runs skip it.
Use `localization.py` for the acceptance table (routing, PatchCore, continual runs through `run_fit`).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import time
from pathlib import Path

import torch

from moleflow.features.backbone import FeatureExtractor
from moleflow.config import RouterConfig, load_config
from moleflow.data import build_dataset
from moleflow.features.cache import FeatureSet, extract_features
from moleflow.metrics import compute_metrics
from moleflow.model.mole_flow import MoLEFlow
from moleflow.router import TaskRouter
from moleflow.scoring import Scorer, anomaly_map, image_score
from moleflow.continual.train import fit_task, seed_everything

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT = [SHARED / "kolektorsdd" / "kolektor", SHARED / "mvtec_ad" / "bottle", SHARED / "mvtec_ad" / "transistor"]


def category_features(folder: Path, split: str, overrides: list[str], cache: str) -> FeatureSet:
    cfg = load_config(None, ["data.dataset=mvtec", f"data.root={folder.parent}", *overrides])
    extractor = FeatureExtractor(cfg.backbone, cfg.data.image_size)
    return extract_features(extractor, build_dataset(cfg.data, folder.name, split), batch_size=cfg.backbone.batch_size,
                            cache_dir=cache, progress=False)


def metrics(fs: FeatureSet, image: torch.Tensor, maps: torch.Tensor) -> dict:
    m = compute_metrics(fs.labels.numpy(), image.numpy(), fs.masks[:, 0].numpy(), maps.numpy())
    return {k: None if v is None else round(v, 4) for k, v in m.items()}


def greedy_coreset(bank: torch.Tensor, share: float, seed: int = 0) -> torch.Tensor:
    """k-centre greedy (PatchCore's coreset): repeatedly keep the patch farthest from those kept."""
    n = max(1, int(share * len(bank)))
    first = int(torch.randint(len(bank), (1,), generator=torch.Generator().manual_seed(seed)))
    sq = bank.pow(2).sum(1)  # (N,) squared distances as ‖b‖² − 2 b·c + ‖c‖²: one mat-vec per step
    dist, kept = sq - 2 * bank @ bank[first] + sq[first], [first]
    for _ in range(n - 1):
        i = int(dist.argmax())
        kept.append(i)
        dist = torch.minimum(dist, sq - 2 * bank @ bank[i] + sq[i])
    return bank[kept]


def knn(folder: Path, cache: str, overrides: list[str], share: float = 0.1, coreset: bool = False) -> dict:
    train, test = category_features(folder, "train", overrides, cache), category_features(folder, "test", overrides, cache)
    c = train.patches.shape[-1]
    bank = train.patches.float().reshape(-1, c)  # (N·H·W, C)
    if coreset:
        bank = greedy_coreset(bank, share)
    else:
        bank = bank[torch.randperm(len(bank), generator=torch.Generator().manual_seed(0))[: int(share * len(bank))]]
    patch = torch.stack([torch.cdist(test.patches[i].float().reshape(-1, c), bank).min(1).values.reshape(test.patches.shape[1:3])
                         for i in range(len(test))])  # (M, H, W)
    return metrics(test, image_score(patch, "topk", 50), anomaly_map(patch, 256, 4.0))


@torch.no_grad()
def score_parts(model: MoLEFlow, t: int, test: FeatureSet, top_k: int, size: int, sigma: float) -> dict:
    parts: dict[str, list[torch.Tensor]] = {"half_z2": [], "minus_logdet": [], "half_u2": []}
    with model.use_task(t):
        for s in range(0, len(test), 16):
            x = test.patches[s : s + 16].float()  # (B, H, W, C)
            z, ld = model(x)
            parts["half_z2"].append(0.5 * z.pow(2).sum(-1))
            parts["minus_logdet"].append(-ld)
            if model.stats_whitening:
                parts["half_u2"].append(0.5 * model.whitening[str(t)](x).pow(2).sum(-1))
    out = {}
    for name, chunks in parts.items():
        if chunks:
            p = torch.cat(chunks)  # (M, H, W)
            out[name] = metrics(test, image_score(p, "topk", top_k), anomaly_map(p, size, sigma))
    return out


def post_processing(test: FeatureSet, patch: torch.Tensor, size: int, sigma: float, top_k: int) -> dict:
    """The same patch scores (M, H, W) under other map blurs and image scores: what the post-processing
    alone changes (the flow is not retrained)."""
    out = {}
    for s in (0.0, 2.0, 4.0, 8.0):
        out[f"blur{s:g}"] = metrics(test, image_score(patch, "topk", top_k), anomaly_map(patch, size, s))
    maps = anomaly_map(patch, size, sigma)
    for k in (1, 10, 50):
        out[f"top{k}"] = metrics(test, image_score(patch, "topk", k), maps)
    out["map_max"] = metrics(test, maps.flatten(1).max(1).values, maps)
    return out


def flow(folders: list[Path], overrides: list[str], cache: str, parts: bool, post: bool = False) -> list[dict]:
    cfg = load_config(None, overrides)
    seed_everything(cfg.train.seed)
    device = torch.device("cpu")
    model = None
    rows = []
    for t, folder in enumerate(folders):
        train = category_features(folder, "train", overrides, cache)
        test = category_features(folder, "test", overrides, cache)
        if model is None:
            model = MoLEFlow(cfg.model, train.patches.shape[-1])
        seed_everything(cfg.train.seed + t)  # as learn_task
        model.add_task(t)
        t0 = time.perf_counter()
        fit_task(model, t, train, cfg.train, cfg.loss, device, progress=False)
        scorer = Scorer(model, TaskRouter(RouterConfig(mode="oracle")), cfg.scoring, cfg.data.image_size, device)
        sc = scorer.score_features(test, torch.full((len(test),), t))
        row = {"task": t, "category": folder.name, **metrics(test, sc.image, sc.maps), "train_s": round(time.perf_counter() - t0, 1)}
        if parts:
            row["parts"] = score_parts(model, t, test, cfg.scoring.top_k, cfg.data.image_size, cfg.scoring.blur_sigma)
        if post:
            row["post"] = post_processing(test, sc.patch, cfg.data.image_size, cfg.scoring.blur_sigma, cfg.scoring.top_k)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("knn", "flow"))
    ap.add_argument("categories", nargs="?", default=None, help="flow: comma-separated class folders, learned in this order")
    ap.add_argument("overrides", nargs="*", help="moleflow config overrides KEY=VALUE")
    ap.add_argument("--category", action="append", default=None, help="knn: class folder (repeatable)")
    ap.add_argument("--share", type=float, default=0.1, help="knn: share of the training patches kept (default %(default)s)")
    ap.add_argument("--coreset", action="store_true", help="knn: keep them by k-centre greedy (PatchCore's coreset), not at random")
    ap.add_argument("--parts", action="store_true")
    ap.add_argument("--post", action="store_true", help="also score under other map blurs and image-score aggregations")
    ap.add_argument("--cache", default=".cache/features", help="feature cache folder (default %(default)s)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.what == "knn":
        overrides = [args.categories, *args.overrides] if args.categories else args.overrides  # knn takes no categories
        for folder in [Path(c) for c in (args.category or DEFAULT)]:
            row = knn(folder, args.cache, overrides, args.share, args.coreset)
            print(json.dumps({"category": folder.name, "share": args.share, "coreset": args.coreset, **row}), flush=True)
        return 0
    if not args.categories:
        ap.error("flow needs the categories, e.g. ../shared/data/mvtec_ad/bottle,../shared/data/mvtec_ad/transistor")
    flow([Path(c) for c in args.categories.split(",")], args.overrides, args.cache, args.parts, args.post)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
