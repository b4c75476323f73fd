"""Micro-batching: requests that arrive together are scored as one batch.

Each request puts its decoded images on a queue and awaits a future. One worker takes the first waiting
request, gathers more for up to `wait_s` or until `max_batch` images, scores them in one call on a
worker thread (torch runs off the event loop), and answers each request with its own slice. Requests
are never split, so a request's images are always scored by one model.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from moleflow.api import Prediction
from moleflow.service.model_slot import Loaded, ModelSlot


@dataclass
class Job:
    images: list[torch.Tensor]  # (3, S, S) each
    names: list[str]
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def score_jobs(slot: ModelSlot, jobs: list[Job]) -> tuple[Loaded, list[list[Prediction]]]:
    """One batch: the current model (reloaded if its files changed) scores every job's images."""
    loaded = slot.refresh()
    images = torch.stack([im for j in jobs for im in j.images])
    preds = loaded.detector.predict_tensors(images, [n for j in jobs for n in j.names])
    out, k = [], 0
    for j in jobs:
        out.append(preds[k : k + len(j.images)])
        k += len(j.images)
    return loaded, out


class Batcher:
    def __init__(self, slot: ModelSlot, max_batch: int, wait_s: float) -> None:
        self.slot, self.max_batch, self.wait_s = slot, max_batch, wait_s
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def submit(self, images: list[torch.Tensor], names: list[str]) -> tuple[Loaded, list[Prediction]]:
        job = Job(images, names)
        await self.queue.put(job)
        return await job.done

    async def _gather(self) -> list[Job]:
        jobs = [await self.queue.get()]
        n = len(jobs[0].images)
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while n < self.max_batch:
            timeout = deadline - asyncio.get_running_loop().time()
            if timeout <= 0:
                break
            try:
                job = await asyncio.wait_for(self.queue.get(), timeout)
            except asyncio.TimeoutError:
                break
            jobs.append(job)
            n += len(job.images)
        return jobs

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._gather()
            try:
                loaded, results = await loop.run_in_executor(None, score_jobs, self.slot, jobs)
            except Exception as exc:  # noqa: BLE001 - each waiting request gets the error, the worker goes on
                for j in jobs:
                    if not j.done.done():
                        j.done.set_exception(exc)
                continue
            for j, r in zip(jobs, results):
                if not j.done.done():
                    j.done.set_result((loaded, r))
