"""Shared fixtures. Keep this small: tiny generated data and the location of the real data."""
from __future__ import annotations

import os
from pathlib import Path

# Before torch is imported anywhere: OpenMP threads that spin-wait slow torch down badly whenever
# another process shares the cores (a parallel test run, a second job on a CI machine).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from helpers import CONFIGS, shared_data_path, write_striped_class, write_tiny_mvtec


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    path = shared_data_path()
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set MOLEFLOW_SHARED_DATA to its location)")
    return path


@pytest.fixture
def tiny_mvtec(tmp_path: Path) -> Path:
    """Root of a tiny MVTec-layout dataset with the classes bottle and grid (32x32 PNGs)."""
    return write_tiny_mvtec(tmp_path / "mvtec", ("bottle", "grid"))


@pytest.fixture(scope="session")
def striped_root(tmp_path_factory) -> Path:
    """Three coloured, striped classes in MVTec layout (64 px): bottle, grid and screw."""
    root = tmp_path_factory.mktemp("striped")
    write_striped_class(root, "bottle", (200, 60, 40), seed=1)
    write_striped_class(root, "grid", (40, 90, 210), seed=2)
    write_striped_class(root, "screw", (60, 200, 60), seed=3)
    return root


@pytest.fixture(scope="session")
def trained_model(striped_root, tmp_path_factory) -> Path:
    """A model of bottle and grid (smoke config, one epoch), trained once per test session; copy it
    before changing it."""
    from moleflow import Detector

    out = tmp_path_factory.mktemp("trained") / "run"
    Detector.fit(CONFIGS / "smoke.yaml", out, [f"data.root={striped_root}", "scenario.tasks=[[bottle],[grid]]"])
    return out / "model"
