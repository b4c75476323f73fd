"""Shared fixtures. Keep this small: tiny generated data and the location of the real data."""
from __future__ import annotations

import os
from pathlib import Path

# Before torch is imported anywhere: OpenMP threads that spin-wait slow torch down badly whenever
# another process shares the cores (a parallel test run, a second job on a CI machine).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
from PIL import Image


def shared_data_path() -> Path:
    """../shared/data beside the checkout, or $MOLEFLOW_SHARED_DATA."""
    env = os.environ.get("MOLEFLOW_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    path = shared_data_path()
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set MOLEFLOW_SHARED_DATA to its location)")
    return path


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


@pytest.fixture
def tiny_mvtec(tmp_path: Path) -> Path:
    """Root of a tiny MVTec-layout dataset with the classes bottle and grid (32x32 PNGs)."""
    return write_tiny_mvtec(tmp_path / "mvtec", ("bottle", "grid"))
