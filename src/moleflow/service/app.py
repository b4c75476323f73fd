"""`moleflow serve`: the inspection service on FastAPI.

    POST /predict   one or more images (multipart field `files`) → per image: product, score, threshold,
                    verdict, and the anomaly map and its overlay as base64 PNGs (`?maps=false` leaves them out)
    GET  /tasks     the products the model knows, with their thresholds
    GET  /health    liveness, the model's generation (it grows with every hot reload)
    GET  /          the operator's page (page.html: no external assets)
    GET  /docs      OpenAPI docs (FastAPI's)

Bad input is a 4xx whose `detail` names the upload and the problem: no files (400), an empty, non-image
or truncated file (400), an upload over the size limit (413). Scoring goes through `Detector`, batched
across concurrent requests (batching.py); the model reloads itself when its directory changes
(model_slot.py).
"""
from __future__ import annotations

import base64
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse

from moleflow.api import Prediction
from moleflow.data import DatasetError, image_from_bytes
from moleflow.results.panels import prediction_pngs
from moleflow.service.batching import Batcher
from moleflow.service.model_slot import Loaded, ModelSlot


@dataclass(frozen=True)
class ServiceConfig:
    model_dir: Path
    max_upload_bytes: int = 20 * 1024 * 1024
    max_batch: int = 16  # images per scoring call
    batch_wait_s: float = 0.01  # how long the first request of a batch waits for company
    max_files: int = 64  # images per request


def _page() -> str:
    return (resources.files("moleflow.service") / "page.html").read_text(encoding="utf-8")


def _tasks(loaded: Loaded) -> dict:
    return {"generation": loaded.generation,
            "tasks": [{"index": r.index, "classes": list(r.classes), "threshold": r.threshold} for r in loaded.detector.tasks]}


def _answer(p: Prediction, filename: str, image, with_maps: bool) -> dict:
    out = {"filename": filename, **p.to_json()}
    del out["source"]
    if with_maps and not p.unknown:
        map_png, overlay_png = prediction_pngs(image, p.anomaly_map, *p.map_range)
        out["map_png"] = base64.b64encode(map_png).decode("ascii")
        out["overlay_png"] = base64.b64encode(overlay_png).decode("ascii")
    return out


async def _read(f: UploadFile, limit: int) -> bytes:
    data = await f.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"upload '{f.filename}' is larger than the limit of {limit} bytes (moleflow serve --max-upload-mb)")
    return data


def create_app(cfg: ServiceConfig) -> FastAPI:
    slot = ModelSlot(cfg.model_dir)
    batcher = Batcher(slot, cfg.max_batch, cfg.batch_wait_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="moleflow inspection service", version="1", lifespan=lifespan,
                  description="Continual anomaly detection: which product, how anomalous, where.")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return _page()

    @app.get("/health")
    def health() -> dict:
        loaded = slot.current
        return {"status": "ok", "generation": loaded.generation, "tasks": len(loaded.detector.tasks)}

    @app.get("/tasks")
    def tasks() -> dict:
        return _tasks(slot.refresh())

    @app.post("/predict")
    async def predict(files: list[UploadFile] = File(default=[]), maps: bool = Query(True)) -> dict:
        if not files:
            raise HTTPException(400, "no images in the request: send one or more image files in the multipart field 'files'")
        if len(files) > cfg.max_files:
            raise HTTPException(400, f"{len(files)} images in one request; at most {cfg.max_files}")
        size = slot.current.detector.image_size
        images, names = [], []
        for f in files:
            data = await _read(f, cfg.max_upload_bytes)
            try:
                images.append(await run_in_threadpool(image_from_bytes, data, size, f"upload '{f.filename}'"))
            except DatasetError as exc:
                raise HTTPException(400, str(exc)) from None
            names.append(f.filename or f"image {len(names)}")
        loaded, preds = await batcher.submit(images, names)
        results = await run_in_threadpool(lambda: [_answer(p, n, im, maps) for p, n, im in zip(preds, names, images)])
        return {"generation": loaded.generation, "results": results}

    return app
