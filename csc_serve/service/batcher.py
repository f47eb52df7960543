"""Adaptive batching across concurrent requests, in one worker thread that owns every model call.

Requests (``submit``) carry a key, and only requests with equal keys share a batch: the service keys
images by operation and exact size, so a batched result is the unbatched one (no padding between
images), while ``lmbda_scale`` varies per request inside a batch. The worker takes the oldest request's
key and everything waiting under it, up to ``max_batch_size`` requests and ``max_batch_pixels`` pixels.
The batch adapts to the load: when the worker comes back from a long batch, the requests that arrived
meanwhile have waited long enough and go at once, so batches grow with the arrival rate; a lone request
on an idle server waits at most ``wait_s`` for company. A payload with a ``timing`` attribute (the request's
``csc_serve.service.metrics.Timing``) is told how long it waited. Beyond ``max_queue`` waiting requests, ``submit``
refuses (``QueueFull``) rather than letting latency grow without bound.

``workers`` threads run batches (one by default, so concurrent requests never oversubscribe the cores the
backend already spreads each batch over). Two suit a backend that accepts concurrent calls and leaves
cores idle at the end of a batch: the next batch starts on them while the last images of the previous one
finish.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

RunBatch = Callable[[Hashable, list[Any]], list[Any]]
Observe = Callable[[int, list[float], float], None]  # batch size, queue waits (s), run time (s)


class QueueFull(RuntimeError):
    """Too many requests are already waiting for the model."""


@dataclass
class _Job:
    key: Hashable
    payload: Any
    pixels: int
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    """``submit(key, payload, pixels) -> Future``; ``run(key, payloads) -> results`` runs each batch."""

    def __init__(self, run: RunBatch, max_batch_size: int = 32, max_batch_pixels: int = 1 << 20,
                 wait_s: float = 0.005, max_queue: int = 1024, observe: Observe | None = None, workers: int = 1):
        self.run, self.observe = run, observe
        self.max_batch_size, self.max_batch_pixels = max_batch_size, max_batch_pixels
        self.wait_s, self.max_queue = wait_s, max_queue
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._loop, name=f"csc-batcher-{i}", daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def __len__(self) -> int:
        return len(self._queue)

    def submit(self, key: Hashable, payload: Any, pixels: int = 1) -> Future:
        job = _Job(key, payload, pixels)
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting for the model")
            self._queue.append(job)
            self._cond.notify()
        return job.future

    def close(self) -> None:
        """Finish the running batch, fail the waiting ones, stop the worker."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            job.future.set_exception(RuntimeError("the service is shutting down"))
        for thread in self._threads:
            thread.join(timeout=60)

    # ----------------------------------------------------------------------------- the worker
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                first = self._queue[0]
                while not self._closed and not self._full(first.key):
                    remaining = first.enqueued + self.wait_s - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._closed:
                    return
                batch = self._take(first.key)
            self._run(first.key, batch)

    def _full(self, key: Hashable) -> bool:
        count = pixels = 0
        for job in self._queue:
            if job.key == key:
                count, pixels = count + 1, pixels + job.pixels
                if count >= self.max_batch_size or pixels >= self.max_batch_pixels:
                    return True
        return False

    def _take(self, key: Hashable) -> list[_Job]:
        batch: list[_Job] = []
        kept: deque[_Job] = deque()
        pixels = 0
        while self._queue:
            job = self._queue.popleft()
            fits = len(batch) < self.max_batch_size and pixels + job.pixels <= self.max_batch_pixels
            if job.key != key or not (fits or not batch):
                kept.append(job)
            elif job.future.set_running_or_notify_cancel():  # False: its caller gave up waiting
                batch.append(job)
                pixels += job.pixels
        self._queue = kept
        return batch

    def _run(self, key: Hashable, batch: list[_Job]) -> None:
        if not batch:
            return
        start = time.monotonic()
        waits = [start - job.enqueued for job in batch]
        for job, wait in zip(batch, waits):
            timing = getattr(job.payload, "timing", None)  # a request's Timing: its queue wait
            if timing is not None:
                timing.waited(wait)
        try:
            results = self.run(key, [job.payload for job in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} gave {len(results)} results")
        except BaseException as err:  # the requests fail, the worker lives on
            for job in batch:
                job.future.set_exception(err)
            return
        if self.observe is not None:  # before the answers: a finished request is in the figures
            self.observe(len(batch), waits, time.monotonic() - start)
        for job, result in zip(batch, results):
            job.future.set_result(result)
