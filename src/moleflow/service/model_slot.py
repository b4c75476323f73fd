"""The model the service answers with, and its hot reload.

`add-task` (or a new model copied in) replaces the model directory's manifest.json by an atomic rename
after every task file is written; the slot notices the change of that file between batches, loads the
new model completely, and only then swaps it in. A batch is scored wholly by one model, and a request
is never split across batches, so every answer comes from one model, old or new.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from moleflow.api import Detector
from moleflow.model import checkpoint

log = logging.getLogger("moleflow.serve")


@dataclass(frozen=True)
class Loaded:
    detector: Detector
    generation: int  # 1 for the model the service started with, +1 per reload
    stamp: tuple[int, int, int]  # manifest.json (inode, size, mtime_ns) when it was loaded


def _stamp(model_dir: Path) -> tuple[int, int, int]:
    st = os.stat(model_dir / checkpoint.MANIFEST)
    return st.st_ino, st.st_size, st.st_mtime_ns


class ModelSlot:
    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        stamp = _stamp(self.model_dir)
        self._current = Loaded(Detector.load(self.model_dir), 1, stamp)
        self._lock = threading.Lock()

    @property
    def current(self) -> Loaded:
        return self._current

    def refresh(self) -> Loaded:
        """The model to score the next batch with: reloaded first when the manifest changed. A model that
        fails to load (e.g. a directory being replaced by hand) is logged and the current one kept."""
        with self._lock:
            try:
                stamp = _stamp(self.model_dir)
            except OSError:
                return self._current
            if stamp != self._current.stamp:
                try:
                    self._current = Loaded(Detector.load(self.model_dir), self._current.generation + 1, stamp)
                    log.info("model reloaded: %d tasks (generation %d)", len(self._current.detector.tasks), self._current.generation)
                except Exception as exc:  # noqa: BLE001 - keep serving the model that works
                    log.warning("model in %s changed but does not load (%s); still serving generation %d",
                                self.model_dir, exc, self._current.generation)
            return self._current
