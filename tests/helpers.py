"""Helpers shared by several test modules: tiny generated datasets, where the real data and configs are,
builders of results.json parts in the layout the jobs write (see moleflow.results.schema), and the
inspection service on a loopback port (`serving`).

Fixtures built on them live in conftest.py; test modules import these functions from here, never from
another test module.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from moleflow.results.schema import METRIC_KEYS, RunResults, Step, summarize

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write_striped_class(root: Path, name: str, colour: tuple[int, int, int], seed: int, size: int = 64) -> None:
    """MVTec layout; each class has its own colour and stripe texture, defects are white squares."""
    rng = np.random.default_rng(seed)
    yy = np.arange(size)[:, None, None]

    def good() -> np.ndarray:
        base = np.array(colour, np.float32)[None, None, :] * (0.75 + 0.25 * np.sin(yy / (2 + seed)))
        return np.clip(base + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)

    for sub, n in (("train/good", 10), ("test/good", 4)):
        (root / name / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(good()).save(root / name / sub / f"{i:03d}.png")
    (root / name / "test/hole").mkdir(parents=True)
    (root / name / "ground_truth/hole").mkdir(parents=True)
    for k in range(4):
        img, mask = good(), np.zeros((size, size), np.uint8)
        y0, x0 = 8 + 10 * k, 6 + 9 * k
        img[y0 : y0 + 12, x0 : x0 + 12] = 255
        mask[y0 : y0 + 12, x0 : x0 + 12] = 255
        Image.fromarray(img).save(root / name / "test/hole" / f"{k:03d}.png")
        Image.fromarray(mask).save(root / name / "ground_truth/hole" / f"{k:03d}_mask.png")


def tiny_memory_model():
    """A two-task MoLEFlow over 8 channels with a 5 % patch memory per task (tasks 0 and 1 added, eval mode)."""
    from moleflow.config import ModelConfig
    from moleflow.model.mole_flow import MoLEFlow

    cfg = ModelConfig(coupling_blocks=2, lora_rank=2, dia_blocks=1, context_kernel=3, pos_encoding="none",
                      memory_share=0.05)
    model = MoLEFlow(cfg, 8).eval()
    for t in (0, 1):
        model.add_task(t)
    return model


def shared_data_path() -> Path:
    """../shared/data beside the checkout, or $MOLEFLOW_SHARED_DATA."""
    env = os.environ.get("MOLEFLOW_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"



def write_tiny_mvtec(root: Path, classes: tuple[str, ...] = ("bottle",), size: int = 32, seed: int = 0) -> Path:
    """An MVTec-layout dataset under `root`: per class 4 train goods, 2 test goods, 2 defects with masks.

    Images are dark noise; defect k of a class has a bright square at its own place, and its mask
    (ground_truth/broken/00k_mask.png, values 0/255) marks exactly that square.
    """
    rng = np.random.default_rng(seed)

    def noise() -> np.ndarray:
        return rng.integers(0, 100, size=(size, size, 3), dtype=np.uint8)  # (H, W, 3)

    for c in classes:
        for sub, n in (("train/good", 4), ("test/good", 2)):
            (root / c / sub).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(noise()).save(root / c / sub / f"{i:03d}.png")
        (root / c / "test/broken").mkdir(parents=True, exist_ok=True)
        (root / c / "ground_truth/broken").mkdir(parents=True, exist_ok=True)
        for k in range(2):
            img, mask = noise(), np.zeros((size, size), np.uint8)
            y0, x0 = 2 + 8 * k, 4 + 12 * k
            img[y0 : y0 + 6, x0 : x0 + 6] = 250
            mask[y0 : y0 + 6, x0 : x0 + 6] = 255
            Image.fromarray(img).save(root / c / "test/broken" / f"{k:03d}.png")
            Image.fromarray(mask).save(root / c / "ground_truth/broken" / f"{k:03d}_mask.png")
    return root


# --------------------------------------------------------------------------- results.json parts

RESULTS_V1 = Path(__file__).parent / "data" / "results_v1"  # results.json files written before format_version


def metrics(image_auroc: float | None, pixel: float | None = None) -> dict:
    """A metrics mapping; pixel AUROC/AP/AUPRO derived from `pixel` (None: a dataset without masks)."""
    values = (image_auroc, pixel, None if pixel is None else pixel / 2, pixel)
    return dict(zip(METRIC_KEYS, values))


def task_entry(task: int, classes: list[str], image_auroc: float | None, pixel: float | None = None,
               routing: float | None = 1.0, n_test: int = 10, oracle_auroc: float | None = None) -> dict:
    """An evaluated task of a step, as evaluate_task + evaluate_seen leave it."""
    m = metrics(image_auroc, pixel)
    oracle = metrics(image_auroc if oracle_auroc is None else oracle_auroc, pixel)
    return {"task": task, **m, "routing_accuracy": routing, "oracle": oracle,
            "per_class": {c: dict(m) for c in classes}, "n_test": n_test, "n_defective": n_test // 2, "classes": classes}


def skipped_entry(task: int, classes: list[str], reason: str = "test data not available") -> dict:
    return {"task": task, "classes": classes, "skipped": reason}


def typed_steps(steps: list[dict]) -> list[Step]:
    return [Step.from_json(s) for s in steps]


def run_results(tasks: list[list[str]], steps: list[dict], **extra) -> RunResults:
    """Typed results of `steps` (dicts) with their summary as the final block."""
    data = {"tasks": tasks, "steps": steps, "final": summarize(typed_steps(steps)).to_json(), **extra}
    return RunResults.from_json(data)


def real_results_text(name: str) -> str:
    """A results.json written by the jobs before format_version existed (fit, eval, ogp)."""
    return (RESULTS_V1 / f"{name}.json").read_text()


def real_results(name: str) -> dict:
    return json.loads(real_results_text(name))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(model_dir: Path, **settings):
    """The service (ServiceConfig(model_dir, **settings)) on a free loopback port in a thread, started as
    `moleflow serve` starts it (the timed protocol included); yields its base URL."""
    import uvicorn

    from moleflow.service.app import ServiceConfig, create_app
    from moleflow.service.server import uvicorn_config

    cfg = ServiceConfig(model_dir, **settings)
    port = free_port()
    server = uvicorn.Server(uvicorn_config(create_app(cfg), cfg, "127.0.0.1", port, "warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)
