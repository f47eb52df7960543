"""Prometheus figures of the service, served on ``/metrics`` beside BentoML's own request metrics, and the time
each request spent in each stage (``Timing``: the ``Server-Timing`` header and the ``csc_stage_seconds``
histograms).

``prometheus_client`` is imported on first use, not at import: BentoML workers set the multiprocess
directory after the service module is imported. The collectors are created once per process.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


_lock = threading.Lock()
_metrics: list[SimpleNamespace] = []


def metrics() -> SimpleNamespace:
    with _lock:  # batcher and request threads ask at once; a collector can be registered only once
        if not _metrics:
            _metrics.append(_create())
        return _metrics[0]


def _create() -> SimpleNamespace:
    from prometheus_client import Counter, Histogram

    return SimpleNamespace(
        batch_size=Histogram("csc_batch_size", "Images (or tiles) per model call", buckets=BATCH_BUCKETS),
        queue_wait=Histogram("csc_queue_wait_seconds", "Time a request waited for its batch",
                             buckets=SECONDS_BUCKETS),
        batch_seconds=Histogram("csc_batch_seconds", "Time of one batched model call", buckets=SECONDS_BUCKETS),
        images=Counter("csc_images", "Images served, by endpoint", ["endpoint"]),
        tiles=Counter("csc_tiles", "Tiles computed for images larger than the tile size"),
        rejected=Counter("csc_rejected_requests", "Requests refused, by HTTP status", ["status"]),
        stage_seconds=Histogram("csc_stage_seconds", "Time a request spent in each stage (as its Server-Timing "
                                "header reports it), by endpoint", ["endpoint", "stage"], buckets=SECONDS_BUCKETS),
    )


# The stages of a request, in order, with what each covers (the Server-Timing descriptions).
STAGES = {
    "read": "reading the request: the upload parsed and the image decoded",
    "estimate": "estimating the noise level (a blind /denoise)",
    "queue": "waiting for the request's first batch to start",
    "batch": "its batches: inputs stacked, the backend call, results split (summed over its tiles)",
    "backend": "the backend calls alone (summed over its tiles)",
    "encode": "encoding the answer: PNG, .npy or .npz",
    "total": "the whole request, as the service saw it",
}


class Timing:
    """Seconds a request spent in each stage of ``STAGES``. The batcher and the batches of its tiles add to it
    from their threads, so updates hold a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def waited(self, seconds: float) -> None:
        """A queue wait of one of its jobs: the request's wait is that of the job that started first."""
        with self._lock:
            self.seconds["queue"] = min(self.seconds.get("queue", seconds), seconds)

    def header(self) -> str:
        """The ``Server-Timing`` value (milliseconds), with the total so far."""
        seconds = {**self.seconds, "total": time.perf_counter() - self._start}
        return ", ".join(f'{stage};dur={1000 * seconds[stage]:.2f};desc="{stage}"' for stage in STAGES
                         if stage in seconds)

    def observe(self, endpoint: str) -> None:
        """Every stage into the ``csc_stage_seconds`` histograms of ``endpoint``."""
        seconds = {**self.seconds, "total": time.perf_counter() - self._start}
        histogram = metrics().stage_seconds
        for stage, value in seconds.items():
            histogram.labels(endpoint=endpoint, stage=stage).observe(value)


def observe_batch(size: int, waits: list[float], seconds: float) -> None:
    m = metrics()
    m.batch_size.observe(size)
    m.batch_seconds.observe(seconds)
    for wait in waits:
        m.queue_wait.observe(wait)
