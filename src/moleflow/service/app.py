"""`moleflow serve`: the inspection service on FastAPI.

    POST /predict   one or more images (multipart field `files`) → per image: product, score, threshold,
                    verdict, and the anomaly map and its overlay as base64 PNGs (`?maps=false` leaves them out)
    GET  /tasks     the products the model knows, with their thresholds
    GET  /health    liveness: "ok", or "degraded" with the reason while the model folder holds a model that
                    does not load; the model's generation (it grows with every hot reload), uploads in flight
    GET  /          the operator's page (page.html: no external assets; it asks for the token if needed)
    GET  /docs      OpenAPI docs (Swagger UI and /redoc, their scripts served from the package fastapi-offline,
                    so no page of the service loads anything from another host)

Bad input is a 4xx whose `detail` names the upload and the problem: no files (400), an empty, non-image
or truncated file (400), an upload over the size limit or an image over the pixel limit (413). The
limits on whole requests and uploads in flight are limits.py, the token auth.py, the header and body
timeouts server.py; headers.py's Content-Security-Policy keeps every page to this host.
Scoring goes through `Detector`, batched across concurrent requests (batching.py);
the model reloads itself when its directory changes (model_slot.py).
"""
from __future__ import annotations

import asyncio
import base64
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from fastapi_offline import FastAPIOffline

from moleflow.api import Prediction
from moleflow.data import DatasetError, image_from_bytes
from moleflow.data.images import ImageTooLargeError
from moleflow.results.panels import prediction_pngs
from moleflow.service.auth import BearerAuth
from moleflow.service.batching import Batcher
from moleflow.service.headers import SecurityHeaders
from moleflow.service.limits import InFlight, UploadLimits
from moleflow.service.model_slot import Loaded, ModelSlot


@dataclass(frozen=True)
class ServiceConfig:
    model_dir: Path
    max_upload_bytes: int = 20 * 1024 * 1024
    max_batch: int = 16  # images per scoring call
    batch_wait_s: float = 0.01  # how long the first request of a batch waits for company
    max_files: int = 64  # images per request
    max_pixels: int = 40_000_000  # width x height from the image header, refused before decoding (a 7000 x 5000 camera)
    max_request_bytes: int | None = None  # a whole request's body; None: max_files x max_upload_bytes + 1 MB
    max_uploads_in_flight: int = 32  # POST requests being received or scored; beyond: 503 at once
    token: str | None = None  # bearer token every route but /health and / needs; None: no authentication
    header_timeout_s: float = 10.0  # request line + headers complete within this (server.py)
    body_timeout_s: float = 30.0  # longest silence while a body is received (server.py)
    keep_alive_s: float = 5.0  # an idle kept-alive connection is closed after this

    @property
    def request_limit(self) -> int:
        # 1 MB for the multipart framing and form fields around the files
        return self.max_request_bytes if self.max_request_bytes is not None else self.max_files * self.max_upload_bytes + (1 << 20)


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


async def _decode(f: UploadFile, cfg: ServiceConfig, size: int, decoding: asyncio.Semaphore):
    data = await _read(f, cfg.max_upload_bytes)
    name = f"upload '{f.filename}'"
    # Decoding is CPU work of up to max_pixels x 3 bytes each: more decodes at once than cores would
    # only add memory, not speed.
    async with decoding:
        try:
            return await run_in_threadpool(image_from_bytes, data, size, name, cfg.max_pixels)
        except ImageTooLargeError as exc:
            raise HTTPException(413, f"{exc} (moleflow serve --max-pixels)") from None
        except DatasetError as exc:
            raise HTTPException(400, str(exc)) from None


def _health(slot: ModelSlot, in_flight: InFlight) -> dict:
    """Never waits for a load: a changed manifest is tried on a worker thread, and a later call shows
    the outcome (a batch or /tasks would try it too)."""
    if slot.pending():
        asyncio.get_running_loop().run_in_executor(None, slot.refresh)
    status, reason = slot.status()
    loaded = slot.current
    out = {"status": status} | ({"reason": reason} if reason else {})
    return out | {"generation": loaded.generation, "tasks": len(loaded.detector.tasks), "uploads_in_flight": in_flight.count}


def create_app(cfg: ServiceConfig) -> FastAPI:
    slot = ModelSlot(cfg.model_dir)
    batcher = Batcher(slot, cfg.max_batch, cfg.batch_wait_s)
    in_flight = InFlight(cfg.max_uploads_in_flight)
    decoding = asyncio.Semaphore(os.cpu_count() or 2)
    page_html = _page()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    # FastAPIOffline: FastAPI whose /docs and /redoc load Swagger UI and ReDoc from its packaged copies,
    # not from a CDN (offline inspection PCs; no third-party request). Swagger UI's online validator is off.
    app = FastAPIOffline(title="moleflow inspection service", version="1", lifespan=lifespan,
                         description="Continual anomaly detection: which product, how anomalous, where.",
                         swagger_ui_parameters={"validatorUrl": None})
    app.add_middleware(UploadLimits, max_request_bytes=cfg.request_limit, in_flight=in_flight)
    if cfg.token:  # added later = runs earlier: an unauthenticated request takes no upload slot
        app.add_middleware(BearerAuth, token=cfg.token)
    app.add_middleware(SecurityHeaders)  # on every answer, refusals included

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return page_html

    @app.get("/health")
    async def health() -> dict:  # async: answered on the event loop, never behind busy worker threads
        return _health(slot, in_flight)

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
        images = [await _decode(f, cfg, size, decoding) for f in files]
        names = [f.filename or f"image {k}" for k, f in enumerate(files)]
        loaded, preds = await batcher.submit(images, names)
        results = await run_in_threadpool(lambda: [_answer(p, n, im, maps) for p, n, im in zip(preds, names, images)])
        return {"generation": loaded.generation, "results": results}

    return app
