"""Localization of moleflow's continual model against per-class PatchCore, on the same backbone features.

    .venv-bench/bin/python benchmarks/localization.py [--category PATH ...] [--orders rotations|given]
                                                      [--set KEY=VALUE ...] [--patchcore-json FILE] [--json]

What it does, in one run:
- moleflow: for each class order, one continual run through `moleflow fit`'s own code (`run_fit`: task by
  task, routing on, every seen task evaluated after each task) with the default model (or `--set`
  overrides). The default orders are the rotations of the categories (kolektor → bottle → transistor,
  bottle → transistor → kolektor, transistor → kolektor → bottle), so every category is learned once as
  task 0 and once or more as a later task, when the shared flow is frozen.
- PatchCore: anomalib 2.x's `PatchcoreModel` per category (told the class), coreset 1 %, 9 neighbours,
  through `benchmarks/peers.py` (same tf_efficientnet_lite0 layers [2, 3], same offline weights, same
  images at 256 px, all training images).
- One table per cell: category × position in the order, moleflow's final metrics (after the last task)
  beside PatchCore's; then per category the spread of pixel AUROC between task 0 and later positions,
  and per order forgetting and routing accuracy.

The categories default to the development categories in ../shared/data: MVTec AD bottle and transistor
and KolektorSDD (a custom class name in MVTec layout). They are linked into one temporary MVTec-layout
root, so a run reads them as a user's folder would be read. `--patchcore-json FILE` stores PatchCore's
rows in FILE and reuses them when FILE exists (PatchCore does not depend on moleflow's settings).
Run it in the benchmark virtualenv (anomalib): see `benchmarks/README.md`.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI (see peers.py)

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from moleflow.features.backbone import resolve_device
from moleflow.config import load_config
from moleflow.continual.jobs import run_fit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import METRIC_COLUMNS, Unavailable, import_anomalib, load_category, log, metrics_of, offline_backbone_state, run_patchcore  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_CATEGORIES = (SHARED / "kolektorsdd" / "kolektor", SHARED / "mvtec_ad" / "bottle", SHARED / "mvtec_ad" / "transistor")
KEYS = [k for k, _ in METRIC_COLUMNS]


def rotations(names: list[str]) -> list[list[str]]:
    return [names[i:] + names[:i] for i in range(len(names))]


def linked_root(folders: list[Path], where: Path) -> Path:
    """One MVTec-layout root holding a symlink per category folder (names must differ)."""
    root = where / "root"
    root.mkdir()
    for f in folders:
        link = root / f.name
        if link.exists():
            raise SystemExit(f"localization: two categories are named {f.name}; rename one folder")
        link.symlink_to(f.resolve(), target_is_directory=True)
    return root


def patchcore_rows(folders: list[Path], cache: Path | None, coreset: float, batch: int) -> dict[str, dict]:
    stored = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    todo = [f for f in folders if f.name not in stored]
    if todo:
        lib, state = import_anomalib(), offline_backbone_state()
        device = resolve_device("auto")
        for f in todo:
            log(f"PatchCore on {f.name} ...")
            cat = load_category(str(f), 256, 0)
            out = run_patchcore(cat, lib, state, batch, device, coreset)
            stored[f.name] = {"metrics": metrics_of(cat, out), "train_s": out.train_s, "infer_img_s": out.infer_img_s,
                              "anomalib": lib["version"], "coreset_ratio": coreset}
            log(f"  PatchCore {f.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in stored[f.name]["metrics"].items() if v is not None))
            if cache is not None:
                cache.write_text(json.dumps(stored, indent=2))
    return {f.name: stored[f.name] for f in folders}


def moleflow_run(order: list[str], root: Path, overrides: list[str], out: Path) -> dict:
    tasks = "[" + ",".join(f"[{c}]" for c in order) + "]"
    cfg = load_config(None, ["data.dataset=mvtec", f"data.root={root}", f"scenario.tasks={tasks}",
                             "output.plots=false", "output.save_model=false", *overrides])
    log(f"moleflow: {' -> '.join(order)} ...")
    t0 = time.perf_counter()
    results = run_fit(cfg, out, progress=False, echo=log)
    return {"results": results, "wall_s": time.perf_counter() - t0}


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def rate(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def table(cells: list[dict], pc: dict[str, dict]) -> list[str]:
    head = ["category", "task", "order"] + [f"{label} (PC)" for _, label in METRIC_COLUMNS] + ["false alarms", "misses"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        m, p = c["metrics"], pc[c["category"]]["metrics"]
        vals = [f"{fmt(m[k])} ({fmt(p[k])})" for k in KEYS] + [rate(c.get("false_alarm")), rate(c.get("miss"))]
        lines.append(f"| {c['category']} | {c['task']} | {c['order']} | " + " | ".join(vals) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--category", action="append", default=None, metavar="PATH", help="MVTec-layout class folder (repeatable)")
    ap.add_argument("--orders", choices=("rotations", "given"), default="rotations",
                    help="rotations: every rotation of the category list (default); given: the list as given, once")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="moleflow config override (repeatable)")
    ap.add_argument("--patchcore-json", type=Path, default=None, help="store / reuse PatchCore's rows in this file")
    ap.add_argument("--coreset-ratio", type=float, default=0.01)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="keep the moleflow run directories here (default: temporary)")
    ap.add_argument("--json", action="store_true", help="print everything as JSON after the table")
    args = ap.parse_args(argv)
    folders = [Path(c) for c in (args.category or DEFAULT_CATEGORIES)]
    missing = [str(f) for f in folders if not (f / "train" / "good").is_dir()]
    if missing:
        print(f"localization: not MVTec-layout class folders: {missing}", file=sys.stderr)
        return 2
    names = [f.name for f in folders]
    orders = rotations(names) if args.orders == "rotations" else [names]
    try:
        pc = patchcore_rows(folders, args.patchcore_json, args.coreset_ratio, args.batch)
    except Unavailable as exc:
        print(f"localization: PatchCore cannot run: {exc}", file=sys.stderr)
        return 2

    cells, runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = linked_root(folders, Path(tmp))
        for i, order in enumerate(orders):
            run_dir = (args.out or Path(tmp)) / f"order{i}"
            run = moleflow_run(order, root, args.set, run_dir)
            res = run["results"]  # RunResults
            for entry in res.steps[-1].per_task:
                cells.append({"category": entry.classes[0], "task": entry.task, "order": " → ".join(order),
                              "metrics": {k: entry.value(k) for k in KEYS}, "routing": entry.routing_accuracy,
                              "false_alarm": entry.false_alarm_rate, "miss": entry.miss_rate})
            runs.append({"order": order, "wall_s": run["wall_s"], "train_s_per_task": list(res.timings.train_s_per_task),
                         "forgetting": res.final.forgetting.to_json(), "routing_accuracy": res.final.routing_accuracy,
                         "final": {k: res.final.routed.get(k) for k in KEYS}})

    cfg = load_config(None, args.set)
    print(f"moleflow (default model{' + ' + ' '.join(args.set) if args.set else ''}; {cfg.train.epochs} epochs per task) "
          f"vs PatchCore (anomalib, coreset {args.coreset_ratio:g}, one model per class); tf_efficientnet_lite0 [2, 3], "
          f"256 px, {torch.get_num_threads()} threads. Cells: moleflow after the last task, routed (PatchCore).\n")
    print("\n".join(table(sorted(cells, key=lambda c: (c["category"], c["task"])), pc)))
    print("\nper category: pixel AUROC as task 0 and as later tasks; worst later-task margin to PatchCore")
    ok = True
    for name in names:
        mine = [c for c in cells if c["category"] == name]
        first = [c["metrics"]["pixel_auroc"] for c in mine if c["task"] == 0]
        later = [c for c in mine if c["task"] > 0]
        p = pc[name]["metrics"]
        spread = max(abs(c["metrics"]["pixel_auroc"] - first[0]) for c in later) if first and later else None
        margins = {k: min(c["metrics"][k] - p[k] for c in later) for k in KEYS if p[k] is not None and later}
        passed = (margins.get("pixel_auroc", 0) >= 0 and margins.get("aupro", 0) >= 0 and margins.get("pixel_ap", 0) >= -0.02
                  and margins.get("image_auroc", 0) >= -0.005 and (spread is None or spread <= 0.005))
        ok &= passed
        print(f"  {name}: task-0 vs later spread {fmt(spread)}; later − PatchCore: "
              + ", ".join(f"{k} {v:+.4f}" for k, v in margins.items()) + ("  [meets the issue's bar]" if passed else "  [below the bar]"))
    for r in runs:
        forg = {k: round(v, 4) for k, v in r["forgetting"].items() if v is not None}
        print(f"  order {' → '.join(r['order'])}: routing {fmt(r['routing_accuracy'])}, forgetting {forg}, "
              f"train s per task {[round(s, 1) for s in r['train_s_per_task']]}, wall {r['wall_s']:.0f} s")
    if args.json:
        print(json.dumps({"cells": cells, "runs": runs, "patchcore": pc}, indent=2, default=float))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
