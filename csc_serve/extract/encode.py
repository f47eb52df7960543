"""Encoding for ``csc extract``: images decoded ahead, batched by size, encoded, turned into rows.

The pieces both engines run (the local one in ``csc_serve.extract.run``, the Ray one in
``csc_serve.extract.ray``): ``decoded`` reads images on a thread pool a little ahead of the encoder,
``form_batches`` groups one shard's images into same-size batches as they arrive, ``StageEncoder`` encodes a
batch with one encoder stage on the fastest backend here, and ``encode_shard`` runs a shard through them and
hands its rows (``csc_serve.extract.shards.sparse_row``) to a writer, batch by batch, in a fixed order.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import numpy as np

from csc_serve.extract.shards import sparse_row

__all__ = ["StageEncoder", "batch_full", "decode_image", "decoded", "encode_shard", "form_batches"]


class StageEncoder:
    """Codes of one encoder stage for a batch of same-size images, plus what the manifest records.

    ``model`` is a bundled name, a model directory or a model-store tag (``csc_serve.model_store``). The last
    stage runs on ``load_backend(model, backend)``; an earlier stage needs every stage's codes, which only the
    PyTorch model gives (the exported graphs end at the last stage).
    """

    def __init__(self, model: str, stage: int | None = None, backend: str = "auto", lmbda_scale: float = 1.0,
                 artifacts: str | os.PathLike | None = None):
        from csc_serve.backends import load_backend
        from csc_serve.model_store import resolve_model

        resolved = resolve_model(model, artifacts)  # a bundled name, a model directory or a model-store tag
        self.source = resolved.source  # where it came from (what the Ray actors load)
        self.module, self.weights_sha256 = resolved.module, resolved.weights_sha256
        num_stages = len(self.module.config.stages)
        self.stage = num_stages if stage is None else stage
        if self.stage > num_stages:
            raise ValueError(f"stage {self.stage} does not exist: the model has {num_stages} stages")
        self.config, self.lmbda_scale = self.module.config, float(lmbda_scale)
        if self.stage == num_stages:
            self.backend = load_backend(resolved, backend)  # a stored model's artifacts, if it carries them
            self.backend_name = self.backend.name
        elif backend not in ("auto", "torch"):
            raise ValueError(f"stage {self.stage} of {num_stages} needs the torch backend, not {backend!r}")
        else:
            self.backend, self.backend_name = None, "torch"
            self.module.ensure_step_sizes()

    def encode_each(self, images: np.ndarray, consume) -> list:
        """``consume(first, codes)`` on the ``(n, K, h, w)`` float32 codes of the chosen stage of images
        ``first, ..., first + n - 1`` of the ``(B, C, H, W)`` batch (by the backend's worker threads where it
        splits batches); the results in image order."""
        if self.backend is not None:
            return self.backend.encode_each(images, self.lmbda_scale, consume)
        import torch

        scale = torch.full((images.shape[0],), self.lmbda_scale)
        with torch.inference_mode():
            codes = self.module.encode(torch.from_numpy(images), scale, all_stages=True)
        return [consume(0, codes[self.stage - 1].float().numpy())]


def decode_image(path: str, channels: int, value_range: tuple[float, float]) -> np.ndarray | str:
    """The image as float32 ``(C, H, W)`` in the model's value range, or one line saying why it cannot be."""
    from csc_serve.models.images import load_image

    try:
        image = load_image(path, channels)  # (C, H, W) in [0, 1]
    except (ValueError, OSError) as err:
        return " ".join(str(err).split())
    low, high = value_range
    return image if (low, high) == (0.0, 1.0) else (low + (high - low) * image).astype(np.float32)


def batch_full(count: int, size: tuple[int, int], batch_size: int, batch_pixels: int) -> bool:
    """Whether ``count`` images of ``size`` make a batch: ``batch_size`` of them, or ``batch_pixels`` pixels."""
    return count >= batch_size or count * size[0] * size[1] >= batch_pixels


def form_batches(items: Iterable[tuple[str, np.ndarray | str]], batch: tuple[int, int], errors: list[dict]
                 ) -> Iterator[tuple[tuple[int, int], list[tuple[str, np.ndarray]]]]:
    """``(size, [(relative path, image), ...])`` batches of one shard's ``items``, yielded as they fill: images
    of one size in input order, a batch full per ``batch_full(count, size, *batch)``, the partial ones at the
    end. Unreadable items (a reason instead of an image) are appended to ``errors``."""
    waiting: dict[tuple[int, int], list[tuple[str, np.ndarray]]] = {}
    for relative, image in items:
        if isinstance(image, str):
            errors.append({"path": relative, "reason": image})
            continue
        size = image.shape[-2:]
        members = waiting.setdefault(size, [])
        members.append((relative, image))
        if batch_full(len(members), size, *batch):
            yield size, waiting.pop(size)
    yield from waiting.items()


def encode_shard(encoder: StageEncoder, items: Iterable[tuple[str, np.ndarray | str]], batch: tuple[int, int],
                 pooled: bool, sink: Callable[[list[dict]], None], runner: ThreadPoolExecutor | None = None,
                 in_flight: int = 1) -> list[dict]:
    """Encode one shard's decoded images, taken from ``items`` as they come: ``sink(rows)`` gets each batch's
    rows, batch after batch in a fixed order; returns the shard's errors (unreadable images, in input order).

    Batches hold images of one size in input order: a batch is encoded as soon as it is full (``batch`` is
    ``(batch_size, batch_pixels)``, see ``form_batches``), the partial ones when the shard ends. So a shard is
    always batched, and its rows ordered, the same way however its decoding is timed, and encoding starts
    long before the last image is decoded. The rows are made from the codes by the backend's worker threads
    (``StageEncoder.encode_each``). With a ``runner``, batches run on its threads, up to ``in_flight`` at
    once, so the backend's workers need not wait for the next batch to be gathered; their rows still reach
    ``sink`` in order."""
    errors: list[dict] = []
    running: deque = deque()  # (future, rows) in the order the batches were formed

    def run(size: tuple[int, int], members: list[tuple[str, np.ndarray]]) -> None:
        rows: list[dict] = [{}] * len(members)

        def to_rows(first: int, codes: np.ndarray) -> None:
            for j, ((relative, _), code) in enumerate(zip(members[first:], codes), first):
                rows[j] = sparse_row(relative, size, code, pooled)

        images = np.stack([image for _, image in members])
        if runner is None:
            encoder.encode_each(images, to_rows)
            sink(rows)
            return
        while len(running) >= in_flight:
            finish_oldest()
        running.append((runner.submit(encoder.encode_each, images, to_rows), rows))

    def finish_oldest() -> None:
        future, rows = running.popleft()
        future.result()
        sink(rows)

    for size, members in form_batches(items, batch, errors):
        run(size, members)
    while running:
        finish_oldest()
    return errors


def decoded(listed: Iterable[tuple[str, str]], pool: ThreadPoolExecutor, threads: int, channels: int,
            value_range: tuple[float, float], images_ahead: int, pixels_ahead: int):
    """``(relative path, image or reason)`` in input order, decoded by ``pool`` (``threads`` threads) ahead of
    the consumer: about ``pixels_ahead`` pixels (judged from the sizes seen so far), at most ``images_ahead``
    images, so large images are not decoded hundreds at a time."""
    window: deque = deque()  # (relative path, future), oldest first
    listed = iter(listed)
    mean_pixels = None  # a running estimate of the pixels per image

    def room() -> int:
        if mean_pixels is None:  # nothing seen yet: one image per decoding thread
            return min(images_ahead, threads)
        return max(1, min(images_ahead, int(pixels_ahead / mean_pixels)))

    while True:
        while len(window) < room():
            item = next(listed, None)
            if item is None:
                break
            window.append((item[0], pool.submit(decode_image, item[1], channels, value_range)))
        if not window:
            return
        relative, future = window.popleft()
        image = future.result()
        if not isinstance(image, str):
            pixels = image.shape[-2] * image.shape[-1]
            # up at once for a larger image, down slowly: a run of small images after a large one is no promise
            mean_pixels = pixels if mean_pixels is None else max(pixels, 0.9 * mean_pixels + 0.1 * pixels)
        yield relative, image
