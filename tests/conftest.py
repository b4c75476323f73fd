"""Shared fixtures. Keep this small: tiny generated data and the location of the real data."""
from __future__ import annotations

import os
from pathlib import Path

# Before torch is imported anywhere: OpenMP threads that spin-wait slow torch down badly whenever
# another process shares the cores (a parallel test run, a second job on a CI machine).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from helpers import shared_data_path, write_tiny_mvtec


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
