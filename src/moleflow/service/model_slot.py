"""The model the service answers with, and its hot reload.

`add-task` (or a new model copied in) replaces the model directory's manifest.json by an atomic rename
after every task file is written; the slot notices the change of that file between batches, loads the
new model completely, and only then swaps it in. A batch is scored wholly by one model, and a request
is never split across batches, so every answer comes from one model, old or new.

A model that does not load is tried once per change of manifest.json: its stamp is remembered, the last
good generation goes on serving, and `status()` reports "degraded" with the one-line load error until
manifest.json changes again (a good model written, or the old manifest put back). Retrying on every
batch would put a failing load (~1 s) into every request's latency.
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

Stamp = tuple[int, int, int] | None  # manifest.json (inode, size, mtime_ns); None while it is missing


@dataclass(frozen=True)
class Loaded:
    detector: Detector
    generation: int  # 1 for the model the service started with, +1 per reload
    stamp: Stamp  # manifest.json when it was loaded


@dataclass(frozen=True)
class Failed:
    stamp: Stamp  # the manifest.json that did not load: not tried again until it changes
    reason: str  # the load error on one line


def _stamp(model_dir: Path) -> Stamp:
    try:
        st = os.stat(model_dir / checkpoint.MANIFEST)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _one_line(exc: BaseException, limit: int = 400) -> str:
    """The load error as /health and the log show it: a CheckpointError already says what is wrong; any
    other error (torch's, a broken file's) is named by its type. Whitespace runs collapse to one line."""
    text = " ".join(str(exc).split()) or "no message"
    if not isinstance(exc, checkpoint.CheckpointError):
        text = f"{exc.__class__.__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ModelSlot:
    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        # The stamp is read before the load, so a manifest replaced during the load is seen as a change.
        # Detector.load names a missing folder or manifest on one line (a bare stat would say [Errno 2]).
        stamp = _stamp(self.model_dir)
        self._current = Loaded(Detector.load(self.model_dir), 1, stamp)
        self._failed: Failed | None = None
        self._lock = threading.Lock()

    @property
    def current(self) -> Loaded:
        return self._current

    def status(self) -> tuple[str, str | None]:
        """("ok", None), or ("degraded", the load error) while the folder holds a model that did not load.
        Never loads anything; `pending()` says whether a changed manifest still waits for a load."""
        failed = self._failed
        if failed is not None and failed.stamp == _stamp(self.model_dir):
            return "degraded", failed.reason
        return "ok", None

    def pending(self) -> bool:
        """manifest.json changed since the last load or failed attempt, and no load is running."""
        stamp = _stamp(self.model_dir)
        failed = self._failed
        seen = stamp == self._current.stamp or (failed is not None and stamp == failed.stamp)
        return not seen and not self._lock.locked()

    def refresh(self) -> Loaded:
        """The model to score the next batch with: reloaded first when the manifest changed since the
        last attempt. A model that fails to load is logged once and the current one kept."""
        with self._lock:
            stamp = _stamp(self.model_dir)
            if stamp == self._current.stamp:
                self._failed = None  # the manifest that serves is back (e.g. restored by hand)
                return self._current
            if self._failed is not None and self._failed.stamp == stamp:
                return self._current
            try:
                self._current = Loaded(Detector.load(self.model_dir), self._current.generation + 1, stamp)
            except Exception as exc:  # noqa: BLE001 - keep serving the model that works
                self._failed = Failed(stamp, _one_line(exc))
                log.warning("model in %s changed but does not load (%s); still serving generation %d, "
                            "tried again when %s changes", self.model_dir, self._failed.reason,
                            self._current.generation, checkpoint.MANIFEST)
                return self._current
            self._failed = None
            log.info("model reloaded: %d tasks (generation %d)", len(self._current.detector.tasks), self._current.generation)
            return self._current
