"""The inspection service under load: images/s, latency and failed requests, with and without an add-task.

    .venv/bin/python benchmarks/serve.py MODEL_DIR IMAGES_DIR [--clients 8] [--requests 160]
        [--add mvtec:transistor --root ../shared/data/mvtec_ad] [--json]

Works on a copy of MODEL_DIR (the original is not changed). Starts `moleflow serve` in its own process on
127.0.0.1, then:
1. `predict`'s batched rate in this process, for reference: what `moleflow predict` does over 80 images
   in batches of `--batch` files (decode them, `Detector.predict_tensors`), minus writing the PNGs;
2. `--clients` concurrent clients send `--requests` requests of one image each (`?maps=false`, the same
   scoring work as the reference), cycling through IMAGES_DIR: served images/s, p50/p99 latency, failed;
3. with `--add`: the same load again, on until `add-task` has learned that class into the served model
   directory (the service reloads between batches; both generations answer); the figures include the
   slowdown of sharing the cores with training; then a short load on the new model.
Prints one table (or `--json`). Time it on an otherwise idle machine.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from moleflow.api import Detector
from moleflow.continual.jobs import run_add_task
from moleflow.data import load_image
from moleflow.predict import collect_images


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def predict_rate(model: Path, files: list[Path], batch: int, count: int = 80) -> float:
    """What `moleflow predict` does per batch, minus writing the PNGs: decode the files, score them;
    over `count` images (batches of `batch`), after one warm-up batch."""
    det = Detector.load(model)

    def once(chunk: list[Path]) -> None:
        det.predict_tensors(torch.stack([load_image(f, det.image_size) for f in chunk]), [str(f) for f in chunk])

    once(files[:batch])  # warm-up
    todo = [files[i % len(files)] for i in range(count)]
    t0 = time.perf_counter()
    for k in range(0, count, batch):
        once(todo[k : k + batch])
    return count / (time.perf_counter() - t0)


class Server:
    """`moleflow serve MODEL --port P` in its own process, as deployed: the clients (and the add-task)
    of this script do not share its interpreter lock."""

    def __init__(self, model: Path, max_batch: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.cmd = [str(Path(sys.executable).parent / "moleflow"), "serve", str(model), "--host", "127.0.0.1",
                    "--port", str(self.port), "--max-batch", str(max_batch), "--quiet"]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"moleflow serve exited with code {self.proc.returncode}")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.proc.kill()
        raise SystemExit("moleflow serve did not answer /health within 300 s")

    def __exit__(self, *exc) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def load(url: str, files: list[Path], clients: int, requests: int, while_alive: threading.Thread | None = None) -> dict:
    """At least `requests` single-image requests from `clients` threads (and, with `while_alive`, on
    until that thread ends); rate, latency percentiles, failures, the model generations that answered."""
    bodies = [(f.name, f.read_bytes()) for f in files]
    latencies: list[float] = []
    failed: list[str] = []
    generations: set[int] = set()
    sent = iter(range(10**9))
    lock = threading.Lock()

    def more() -> int | None:
        with lock:
            i = next(sent)
        return i if i < requests or (while_alive is not None and while_alive.is_alive()) else None

    def client() -> None:
        with httpx.Client(base_url=url, timeout=600) as http:  # one keep-alive connection per client, as a camera PC's
            while (i := more()) is not None:
                send(http, *bodies[i % len(bodies)])

    def send(http: httpx.Client, name: str, data: bytes) -> None:
        t0 = time.perf_counter()
        try:
            r = http.post("/predict?maps=false", files=[("files", (name, data, "image/png"))])
        except httpx.HTTPError as exc:
            failed.append(repr(exc))
            return
        if r.status_code != 200:
            failed.append(f"{r.status_code}: {r.text[:200]}")
            return
        generations.add(r.json()["generation"])
        latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {"requests": len(latencies) + len(failed), "clients": clients, "img_s": len(latencies) / wall, "p50_ms": 1000 * q[49],
            "p99_ms": 1000 * q[98], "failed": len(failed), "failures": failed[:5], "generations": sorted(generations), "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("images", type=Path)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--batch", type=int, default=8, help="predict's batch size for the reference rate (default %(default)s)")
    ap.add_argument("--max-batch", type=int, default=16, help="the service's --max-batch")
    ap.add_argument("--add", help="DATASET:CLASS learned by add-task during the second load phase")
    ap.add_argument("--root", help="root of the --add dataset")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    files = collect_images([args.images])
    out: dict = {"threads": torch.get_num_threads(), "images": len(files)}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "run" / "model"
        shutil.copytree(args.model, model)
        log("predict's batched rate ...")
        out["predict_img_s"] = predict_rate(model, files, args.batch)
        with Server(model, args.max_batch) as url:
            log(f"{args.clients} clients, {args.requests} requests ...")
            out["served"] = load(url, files, args.clients, args.requests)
            if args.add:
                log(f"the same while add-task learns {args.add} ...")
                dataset = args.add.split(":", 1)[0]
                adder = threading.Thread(target=run_add_task, args=(model, [[args.add]], {dataset: args.root} if args.root else {},
                                                                     Path(tmp) / "add"), kwargs={"progress": False, "echo": log})
                adder.start()
                out["served_during_add_task"] = load(url, files, args.clients, args.requests, while_alive=adder)
                adder.join()
                out["served_after_add_task"] = load(url, files, args.clients, max(args.requests // 4, args.clients))
    out["served_over_predict"] = out["served"]["img_s"] / out["predict_img_s"]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"predict (batched, {args.batch} per call): {out['predict_img_s']:.2f} images/s; {out['threads']} threads")
    print("| phase | clients | requests | images/s | p50 ms | p99 ms | failed | model generations |")
    print("|---|---|---|---|---|---|---|---|")
    for key in ("served", "served_during_add_task", "served_after_add_task"):
        if key in out:
            r = out[key]
            print(f"| {key} | {r['clients']} | {r['requests']} | {r['img_s']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                  f"{r['failed']} | {r['generations']} |")
    print(f"served / predict: {out['served_over_predict']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
