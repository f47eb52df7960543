"""Prometheus figures of the service, served on ``/metrics`` beside BentoML's own request metrics.

``prometheus_client`` is imported on first use, not at import: BentoML workers set the multiprocess
directory after the service module is imported. The collectors are created once per process.
"""

from __future__ import annotations

import threading
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
    )


def observe_batch(size: int, waits: list[float], seconds: float) -> None:
    m = metrics()
    m.batch_size.observe(size)
    m.batch_seconds.observe(seconds)
    for wait in waits:
        m.queue_wait.observe(wait)
