"""`moleflow predict --ray`: score a large image set on a Ray cluster with Ray Data.

The images are cut into the same batches as the local path; `map_batches` hands each batch to an actor
that loaded the model once (one CPU slot, one thread) and writes the batch's PNGs; the driver collects
the lines in order and writes the same predictions.jsonl as `run_predict` without Ray. Paths must be
visible to every node of the cluster (the model, the images and the output folder).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from moleflow.api import Detector
from moleflow.continual.parallel import connect
from moleflow.predict import predict_batch


class PredictActor:
    """Loads the detector once; scores one batch per call (Ray Data's callable-class protocol)."""

    def __init__(self, model_dir: str, runtime: str, export_dir: str | None, out_dir: str) -> None:
        torch.set_num_threads(1)
        self.detector = Detector.load(model_dir, runtime, export_dir)
        self.out_dir = Path(out_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        lines = []
        for start, files, shown in zip(batch["start"], batch["files"], batch["shown"]):
            lines.append(json.dumps(predict_batch(self.detector, [Path(f) for f in json.loads(files)], int(start),
                                                   self.out_dir, json.loads(shown))))
        return {"start": list(batch["start"]), "lines": lines}


def predict_on_ray(address: str, model_dir: Path, runtime: str, export_dir: Path | None, files: list[Path],
                   out_dir: Path, batch_size: int) -> list[str]:
    """predictions.jsonl's lines for `files`, scored by Ray Data actors (one per CPU slot of the cluster)."""
    ray = connect(address)
    items = [{"start": s, "files": json.dumps([str(f.resolve()) for f in files[s : s + batch_size]]),
              "shown": json.dumps([str(f) for f in files[s : s + batch_size]])} for s in range(0, len(files), batch_size)]
    actors = max(1, min(len(items), int(ray.cluster_resources().get("CPU", 1))))
    ds = ray.data.from_items(items).map_batches(
        PredictActor, batch_size=1, concurrency=actors, num_cpus=1,
        fn_constructor_args=(str(Path(model_dir).resolve()), runtime, str(Path(export_dir).resolve()) if export_dir else None,
                             str(Path(out_dir).resolve())),
    )
    rows = sorted(ds.take_all(), key=lambda r: int(r["start"]))
    return [line for r in rows for line in json.loads(r["lines"])]
