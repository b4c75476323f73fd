"""The router's `unknown` answer on real products: learned ones must pass, a never-learned one must not.

    .venv/bin/python benchmarks/unknown.py [--learn mvtec:bottle,mvtec:transistor,elpv:mono,elpv:poly]
        [--new kolektor] [--cache .cache/features]

Fits the router as `moleflow fit` does with `router.unknown=true` (default descriptor and covariance; the
unknown threshold calibrated on the held-out fifth of each task's training images, as the thresholds of
the scores are) from the backbone features of each learned product's training images, then prints per
product the share of its test images (good and defective) called unknown, and the same share for the
images of the never-learned products. Only the router is involved (no flow is trained), so it takes the
backbone's time: about two minutes with the feature cache cold.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from moleflow.config import Config, load_config
from moleflow.continual.system import calibration_index, calibration_seed
from moleflow.data import build_dataset
from moleflow.features.backbone import FeatureExtractor
from moleflow.features.cache import FeatureSet, extract_features
from moleflow.router import UNKNOWN, TaskRouter

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def product_features(cfg: Config, extractor: FeatureExtractor, spec: str, split: str, cache: str) -> FeatureSet:
    """Features of a product's split: "dataset:class", or a class folder's path (MVTec layout)."""
    if ":" in spec:
        ds = build_dataset(cfg.data, spec, split)
    else:
        folder = Path(spec)
        ds = build_dataset(dataclasses.replace(cfg.data, root=str(folder.parent), roots={}), folder.name, split)
    return extract_features(extractor, ds, batch_size=cfg.backbone.batch_size, cache_dir=cache, progress=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--learn", default="mvtec:bottle,mvtec:transistor,elpv:mono,elpv:poly")
    ap.add_argument("--new", default=str(SHARED / "kolektorsdd" / "kolektor"), help="never-learned products: MVTec-layout class folders, comma-separated")
    ap.add_argument("--cache", default=".cache/features")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    cfg = load_config(None, ["data.dataset=mvtec", f"data.roots={json.dumps({'mvtec': str(SHARED / 'mvtec_ad')})}", "router.unknown=true"])
    extractor = FeatureExtractor(cfg.backbone, cfg.data.image_size)

    def features(spec: str, split: str) -> FeatureSet:
        return product_features(cfg, extractor, spec, split, args.cache)

    router = TaskRouter(cfg.router)
    learned = args.learn.split(",")
    for t, spec in enumerate(learned):
        train = features(spec, "train")
        held = calibration_index(len(train), cfg.scoring.calibration_holdout, calibration_seed(cfg, t))
        router.add_task(t, train.descriptors, held_out=held)
    rows = []
    for t, spec in enumerate(learned):
        test = features(spec, "test")
        routed = router.route(test.descriptors)
        rows.append({"product": spec, "learned": True, "images": len(test), "unknown": float((routed == UNKNOWN).float().mean()),
                     "routed_right": float((routed == t).float().mean())})
    for spec in args.new.split(","):
        imgs = [features(spec, "train"), features(spec, "test")]
        routed = torch.cat([router.route(f.descriptors) for f in imgs])
        rows.append({"product": spec, "learned": False, "images": len(routed), "unknown": float((routed == UNKNOWN).float().mean()),
                     "routed_right": None})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| product | learned | images | called unknown | routed to its task |")
    print("|---|---|---|---|---|")
    for r in rows:
        right = "-" if r["routed_right"] is None else f"{100 * r['routed_right']:.1f} %"
        print(f"| {r['product']} | {'yes' if r['learned'] else 'no'} | {r['images']} | {100 * r['unknown']:.1f} % | {right} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
