"""What every ``csc bench`` mode shares: seeded bench images, timing a call, the float32 matmul peak, the
least-squares fit of time against pixels, and writing the JSON report."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def matmul_peak(threads: int, size: int = 2048, repeats: int = 10) -> float:
    """Best float32 GFLOP/s of a square matmul (MKL/oneDNN through torch) with ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    b = torch.randn(size, size, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def bench_images(batch: int, size: int, channels: int, data: str | None, seed: int = 0) -> np.ndarray:
    """``batch`` images of ``size`` x ``size`` in [0, 1]: crops of the images in ``data``, or smooth random ones."""
    rng = np.random.default_rng(seed)
    if data:
        from csc_serve.models.images import list_images, load_image

        paths = list_images(data)
        if not paths:
            raise ValueError(f"{data}: no images")
        out = []
        for i in range(batch):
            image = load_image(paths[i % len(paths)], channels)  # (C, H, W) float32
            reps = (1, -(-size // image.shape[1]), -(-size // image.shape[2]))
            image = np.tile(image, reps)
            y = rng.integers(0, image.shape[1] - size + 1)
            x = rng.integers(0, image.shape[2] - size + 1)
            out.append(image[:, y : y + size, x : x + size])
        return np.ascontiguousarray(np.stack(out), dtype=np.float32)
    noise = rng.random((batch, channels, size // 8 + 2, size // 8 + 2), dtype=np.float32)
    up = noise.repeat(8, axis=2).repeat(8, axis=3)[:, :, :size, :size]  # blocky
    return np.clip(up + 0.05 * rng.standard_normal(up.shape, dtype=np.float32), 0, 1).astype(np.float32)


def time_call(fn: Callable[[], Any], min_time: float, min_repeats: int) -> dict[str, float]:
    start = time.perf_counter()
    fn()  # warm-up: allocations, lazy initialisation, compilation
    warmup = time.perf_counter() - start
    # A call that takes many times min_time is timed once: its own length averages out the noise.
    needed = 1 if warmup > 5 * max(min_time, 1e-3) else min_repeats
    times: list[float] = []
    while len(times) < needed or sum(times) < min_time:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": float(np.median(times)), "min_s": float(min(times)), "repeats": len(times)}


def linear_fit(pixels: list[int], seconds: list[float]) -> dict[str, float]:
    """Least squares ``t = a + b * pixels``, its R^2, and the slope of ``log t`` against ``log pixels``."""
    x, y = np.asarray(pixels, float), np.asarray(seconds, float)
    b, a = np.polyfit(x, y, 1)
    residual = y - (a + b * x)
    r2 = 1 - float(residual @ residual) / float(((y - y.mean()) ** 2).sum())
    slope = float(np.polyfit(np.log(x), np.log(y), 1)[0])
    return {"intercept_s": float(a), "seconds_per_megapixel": float(b * 1e6), "r2": r2, "loglog_slope": slope}


def write_report(report: dict[str, Any], path: str | Path) -> None:
    from csc_serve.models.serialization import atomic_write

    text = json.dumps(report, indent=2, default=float) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))
