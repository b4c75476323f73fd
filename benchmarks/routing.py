"""Routing on real products: the default descriptor rule (per-axis Student-t distances) against the same
descriptor under Gaussian distances (`router.robust_dof=0`) and the hybrid rule read by the patch memories.

    .venv/bin/python benchmarks/routing.py [--learn mvtec:bottle,elpv:mono,elpv:poly,mvtec:transistor,KOLEKTOR_FOLDER]
        [--memory-share 0.01] [--top-k 2] [--cache .cache/features] [--json]

Learns each product as `moleflow fit` would for routing: the router's prototype from the backbone
descriptors of its training images and, for the hybrid rule, its patch memory (a greedy coreset of
`--memory-share` of its training patches, `model.memory_share`). No flow is trained: the memory rule
(`router.mode=hybrid router.hybrid_score=memory`) reads only the memories. Prints, per learned product,
the share of its test images (good and defective) routed to it under each rule, and every misrouted file.
The backbone's time (a few minutes with the feature cache cold) plus one coreset per product.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import time
from pathlib import Path

import torch

from moleflow.config import load_config
from moleflow.features.backbone import FeatureExtractor
from moleflow.features.cache import FeatureSet
from moleflow.model.mole_flow import MoLEFlow
from moleflow.router import TaskRouter
from moleflow.scoring import Scorer
from unknown import product_features  # benchmarks/unknown.py, beside this script

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RULES = {"descriptor (default)": ["router.mode=mahalanobis"],
         "descriptor, Gaussian": ["router.mode=mahalanobis", "router.robust_dof=0"],
         "hybrid, memory": ["router.mode=hybrid", "router.hybrid_score=memory"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--learn", default=f"mvtec:bottle,elpv:mono,elpv:poly,mvtec:transistor,{SHARED / 'kolektorsdd' / 'kolektor'}",
                    help="learned products in order: dataset:class or an MVTec-layout class folder, comma-separated")
    ap.add_argument("--memory-share", type=float, default=0.01)
    ap.add_argument("--top-k", type=int, default=2, help="router.hybrid_top_k")
    ap.add_argument("--cache", default=".cache/features")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    base = ["data.dataset=mvtec", f"data.roots={json.dumps({'mvtec': str(SHARED / 'mvtec_ad')})}",
            f"model.memory_share={args.memory_share}", f"router.hybrid_top_k={args.top_k}"]
    cfg = load_config(None, base + RULES["hybrid, memory"])
    extractor = FeatureExtractor(cfg.backbone, cfg.data.image_size)

    def features(spec: str, split: str) -> FeatureSet:
        return product_features(cfg, extractor, spec, split, args.cache)

    learned = args.learn.split(",")
    routers = {rule: TaskRouter(load_config(None, base + over).router) for rule, over in RULES.items()}
    model = None
    coreset_seconds = []
    for t, spec in enumerate(learned):
        train = features(spec, "train")
        if model is None:
            model = MoLEFlow(cfg.model, train.patches.shape[-1]).eval()
        model.add_task(t)
        t0 = time.perf_counter()
        model.fit_memory(t, train.patches, seed=cfg.train.seed, flow_scale=False)  # no flow: the rule reads the memory
        coreset_seconds.append(time.perf_counter() - t0)
        for router in routers.values():
            router.add_task(t, train.descriptors)
    rows = []
    for t, spec in enumerate(learned):
        test = features(spec, "test")
        row = {"product": spec, "images": len(test), "coreset_seconds": round(coreset_seconds[t], 1)}
        for rule, router in routers.items():
            scorer = Scorer(model, router, cfg.scoring, cfg.data.image_size, torch.device("cpu"))
            routed = torch.cat([scorer.route(test.patches[s:s + 64], test.descriptors[s:s + 64])
                                for s in range(0, len(test), 64)])
            wrong = (routed != t).nonzero().squeeze(1).tolist()
            row[rule] = {"right": 1 - len(wrong) / len(test),
                         "misrouted": [f"{test.paths[i]} -> {learned[int(routed[i])]}" for i in wrong]}
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"memory share {args.memory_share}, hybrid top-{args.top_k}; test images routed to their own product")
    print("| product | images | " + " | ".join(RULES) + " | coreset s |")
    print("|---|---|" + "---|" * len(RULES) + "---|")
    for r in rows:
        cells = " | ".join(f"{100 * r[rule]['right']:.1f} % ({len(r[rule]['misrouted'])} wrong)" for rule in RULES)
        print(f"| {r['product']} | {r['images']} | {cells} | {r['coreset_seconds']} |")
    for r in rows:
        for rule in RULES:
            for m in r[rule]["misrouted"]:
                print(f"  {rule}: {m}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
