"""What one batch does on the backend: the batcher's ``run`` for the service's keyed work items.

Keys are ``(op, *shape)``: every item of a batch has the same operation and the same array shape, so the
items stack into one backend call with one ``lmbda_scale`` (and one ``sigma``) per item. Every operation is one
pass of one graph, and what it reports about the codes comes out of that pass
(``csc_serve.export.graphs``):

- ``encode``: last-stage codes per item, with the zero counts of every earlier stage inside the item's
  ``core``.
- ``reconstruct`` and ``denoise``: the (shift-averaged) reconstruction per item, with the zero count of the
  last-stage codes it was made of inside the item's ``core``.
- ``decode``: images of codes, cropped to the items' ``output_size``.

A zero count is ``(zero codes, codes)``: the codes of the stage at the positions of its grid inside the core,
times the shifted copies for a shift-averaged reconstruction.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from csc_serve.service.metrics import Timing


@dataclass(frozen=True)
class Work:
    """One image, tile or code array; ``core`` (top, left, bottom, right, in pixels) bounds its zero counts;
    ``sigma`` (0..255) reaches noise-adaptive thresholds; ``timing`` (the request's) collects the seconds of the
    batch that served it."""

    array: np.ndarray
    scale: float = 1.0
    core: tuple[int, int, int, int] | None = None
    output_size: tuple[int, int] | None = None
    sigma: float = 0.0
    timing: Timing | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Counted:
    """A result with zero counts: ``(zeros, codes)`` per stage before the last (encode) or of the last (images)."""

    array: np.ndarray
    zeros: list[tuple[int, int]]


def run_batch(model_config, backend, key: tuple, items: list[Work]) -> list:
    """One backend call for a batch of equal-sized arrays (in the batcher's thread). Each item's ``timing``
    (where given) gets the seconds of the batch (``batch``: stacking, the call and splitting) and of the
    backend call (``backend``)."""
    start = time.perf_counter()
    op = key[0]
    batch = np.stack([item.array for item in items])
    scales = np.array([item.scale for item in items], np.float32)
    sigmas = np.array([item.sigma for item in items], np.float32)
    called = time.perf_counter()
    if op == "decode":
        out = backend.decode(batch, output_size=items[0].output_size)
        results = list(out)
    elif op == "encode":
        codes, stage_zeros = backend.encode_counting(batch, scales, sigmas)
        grids = np.cumprod([stage.stride for stage in model_config.stages])  # stage l's code grid, in pixels
        sizes = [stage.num_atoms for stage in model_config.stages]
        results = [Counted(codes[i], [zero_count(maps[i], item.core, int(grid), size)
                                      for maps, grid, size in zip(stage_zeros, grids, sizes)])
                   for i, item in enumerate(items)]
    elif op in ("reconstruct", "denoise"):
        out, zeros = backend.reconstruct_counting(batch, scales, sigmas)
        per_position = model_config.code_channels * (len(model_config.shifts) if model_config.shift_average else 1)
        stride = model_config.total_stride
        results = [Counted(out[i], [zero_count(zeros[i], item.core, stride, per_position)])
                   for i, item in enumerate(items)]
    else:
        raise ValueError(f"unknown operation {op!r}")
    done = time.perf_counter()
    for item in items:
        if item.timing is not None:
            item.timing.add("backend", done - called)
            item.timing.add("batch", done - start)
    _memory.after_batch(batch.size)
    return results


class _GiveBack:
    """Hands the C heap's free memory back to the system (glibc ``malloc_trim``) after large work.

    The backend frees a batch's working set when it ends (ONNX Runtime's arena shrinks after every run), but
    glibc keeps freed memory in the per-thread heaps of the threads that ran the batch, where a server would
    hold it forever: the peak of one large image would become the server's size. Trimming has a price: the
    next batches fault the pages back in (measured: 3% of the throughput of 256x256 encodes when it ran every
    second). So once ``TRIM_VALUES`` array values went through since the last trim, it runs ``QUIET_S`` after the
    last batch when the load stops, and under a steady load at most every ``INTERVAL_S``. Elsewhere than glibc
    it does nothing."""

    TRIM_VALUES = 1 << 22
    QUIET_S = 1.0
    INTERVAL_S = 30.0

    def __init__(self) -> None:
        self.values = 0
        self.last = time.monotonic()
        self.lock = threading.Lock()
        self.timer: threading.Timer | None = None
        self.trim = None
        try:
            import ctypes

            self.trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            pass

    def after_batch(self, values: int) -> None:
        if self.trim is None:
            return
        with self.lock:
            self.values += values
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if self.values < self.TRIM_VALUES:
                return
            if time.monotonic() - self.last < self.INTERVAL_S:
                self.timer = threading.Timer(self.QUIET_S, self._run)
                self.timer.daemon = True
                self.timer.start()
                return
        self._run()

    def _run(self) -> None:
        with self.lock:
            self.values, self.last, self.timer = 0, time.monotonic(), None
        self.trim(0)


_memory = _GiveBack()


def zero_count(counts: np.ndarray, core: tuple[int, int, int, int] | None, grid: int,
               per_position: int) -> tuple[int, int]:
    """(zero codes, codes) of a map of zero counts ``(h, w)`` inside ``core`` (pixels, multiples of ``grid``),
    each position holding ``per_position`` codes."""
    if core is not None:
        top, left, bottom, right = (v // grid for v in core)
        counts = counts[top:bottom, left:right]
    return int(round(float(counts.sum(dtype=np.float64)))), int(counts.size * per_position)
