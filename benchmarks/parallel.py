"""Learning K tasks one after another and side by side on a local Ray cluster, in one run.

    .venv/bin/python benchmarks/parallel.py [--images 100] [--epochs 5] [--workers 1,2] [--json]

A base model learns task 0 (ELPV mono) first, untimed. Then the same K = 4 further products (MVTec AD
bottle and transistor, KolektorSDD, ELPV poly, from ../shared/data; each its first `--images` training
images) are learned onto copies of it:

- sequential, 1 thread   the reference whose task files the parallel run reproduces byte for byte
                         (torch and BLAS on one thread, as `OMP_NUM_THREADS=1 moleflow add-task`);
- sequential, all cores  the plain `moleflow add-task` (torch on every core);
- Ray, W workers         `add-task --ray` on a local cluster of W one-thread CPU slots (the cluster's
                         start is included in the time; printed apart as well).

The timed part is learning: each task's training features (decoded and extracted, no cache) and its
training, threshold calibration and router prototype; the evaluation that `add-task` does afterwards
is the same work either way and is left out. The task files of every Ray run are compared with the
1-thread reference. Prints the machine's core count, a table (or --json). Run on an idle machine.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

from moleflow.config import load_config
from moleflow.continual.jobs import run_fit
from moleflow.continual.parallel import learn_tasks
from moleflow.continual.system import learn_new_task, load_system, task_features, task_file_tensors

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PRODUCTS = {"bottle": SHARED / "mvtec_ad" / "bottle", "transistor": SHARED / "mvtec_ad" / "transistor",
            "kolektor": SHARED / "kolektorsdd" / "kolektor"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def base_model(where: Path, images: int, epochs: int) -> Path:
    """A model that knows task 0 (ELPV mono), with every further product's folder under one root."""
    root = where / "root"
    root.mkdir()
    for name, folder in PRODUCTS.items():
        if not (folder / "train").is_dir():
            raise SystemExit(f"parallel: {folder} is missing (the shared data, see ../shared/data/README.md)")
        (root / name).symlink_to(folder.resolve(), target_is_directory=True)
    cfg = load_config(None, [f"data.root={root}", "scenario.tasks=[[elpv:mono]]", f"data.max_train_images={images}",
                             f"train.epochs={epochs}", "output.plots=false"])
    run_fit(cfg, where / "base", progress=False, echo=lambda _: None)
    return where / "base" / "model"


def jobs_after(first: int) -> dict[int, list[str]]:
    specs = [f"mvtec:{name}" for name in PRODUCTS] + ["elpv:poly"]
    return {first + i: [s] for i, s in enumerate(specs)}


@contextlib.contextmanager
def threads(n: int | None):
    """torch and BLAS on n threads inside the block (None: as they are)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        with threadpool_limits(n) if n is not None else contextlib.nullcontext():
            yield
    finally:
        torch.set_num_threads(before)


def sequential(model: Path, jobs: dict[int, list[str]], n_threads: int | None) -> tuple[float, dict]:
    system = load_system(model)
    with threads(n_threads):
        t0 = time.perf_counter()
        for t, specs in jobs.items():
            learn_new_task(system, specs, task_features(system, specs, "train", progress=False), progress=False, step=t)
        seconds = time.perf_counter() - t0
    return seconds, {t: task_file_tensors(system, t) for t in jobs}


def on_ray(model: Path, jobs: dict[int, list[str]], workers: int) -> tuple[float, float, dict]:
    import ray

    system = load_system(model)
    t0 = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, logging_level="warning")
    started = time.perf_counter() - t0
    try:
        learn_tasks(system, model, jobs, "local", echo=log)
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return seconds, started, {t: task_file_tensors(system, t) for t in jobs}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[t].keys() == b[t].keys() and all(torch.equal(a[t][k], b[t][k]) for k in a[t]) for t in a)


# long function: the run's steps in order, each a line, read better in one place
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=100, help="training images per product")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--workers", default="1,2", help="Ray cluster sizes to time, comma-separated")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    cores = os.cpu_count()
    log(f"{cores} cores; {args.images} training images per product, {args.epochs} epochs")
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        base = base_model(where, args.images, args.epochs)
        jobs = jobs_after(1)

        def copy(name: str) -> Path:
            return Path(shutil.copytree(base, where / name))

        rows = []
        log("sequential, 1 thread ...")
        ref_s, ref = sequential(copy("seq1"), jobs, 1)
        rows.append({"variant": "sequential, 1 thread", "seconds": ref_s, "same_files": True})
        log("sequential, all cores ...")
        all_s, _ = sequential(copy("seqN"), jobs, None)
        rows.append({"variant": f"sequential, {torch.get_num_threads()} threads", "seconds": all_s, "same_files": None})
        for w in workers:
            log(f"Ray, {w} worker(s) ...")
            s, started, tensors = on_ray(copy(f"ray{w}"), jobs, w)
            rows.append({"variant": f"Ray, {w} one-thread worker(s)", "seconds": s, "ray_start_s": started, "same_files": same(tensors, ref)})
    for r in rows:
        r["vs_seq_1_thread"] = r["seconds"] / ref_s
        r["vs_seq_all_cores"] = r["seconds"] / all_s
    out = {"cores": cores, "tasks": len(jobs), "images": args.images, "epochs": args.epochs, "rows": rows}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{cores} cores; learning {len(jobs)} tasks ({args.images} training images each, {args.epochs} epochs) onto a 1-task model\n")
    print("| variant | wall s | × sequential 1 thread | × sequential all cores | Ray start s | task files = 1-thread reference |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        start = f"{r['ray_start_s']:.1f}" if "ray_start_s" in r else "-"
        files = {True: "identical", False: "DIFFER", None: "-"}[r["same_files"]]
        print(f"| {r['variant']} | {r['seconds']:.1f} | {r['vs_seq_1_thread']:.2f} | {r['vs_seq_all_cores']:.2f} | {start} | {files} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
