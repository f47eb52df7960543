"""What one batch does on the backend: the batcher's ``run`` for the service's keyed work items.

Keys are ``(op, *shape)``: every item of a batch has the same operation and the same array shape, so the
items stack into one backend call with one ``lmbda_scale`` per item. Operations:

- ``encode``: last-stage codes per item.
- ``reconstruct``: ``decode(encode(x))`` per item, with the zero count of its codes inside the item's
  ``core``, counted between the two (the shift-averaged graph for shift-averaging models, plus an encode
  for the codes).
- ``denoise``: the fused reconstruct graph (no codes leave it).
- ``stages``: zero counts of every stage but the last, from the PyTorch model, whose encoder returns every
  stage (the exported graphs end at the last stage).
- ``decode``: images of codes, cropped to the items' ``output_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Work:
    """One image, tile or code array; ``core`` (top, left, bottom, right, in pixels) bounds its sparsity."""

    array: np.ndarray
    scale: float = 1.0
    core: tuple[int, int, int, int] | None = None
    output_size: tuple[int, int] | None = None


def run_batch(model, backend, key: tuple, items: list[Work]) -> list:
    """One backend call for a batch of equal-sized arrays (in the batcher's thread)."""
    op = key[0]
    batch = np.stack([item.array for item in items])
    scales = np.array([item.scale for item in items], np.float32)
    if op == "decode":
        return list(backend.decode(batch, output_size=items[0].output_size))
    if op == "encode":
        return list(backend.encode(batch, scales))
    if op == "denoise":
        return list(backend.reconstruct(batch, scales))
    if op == "stages":
        return _earlier_stage_zeros(model, batch, scales, items)
    if op != "reconstruct":
        raise ValueError(f"unknown operation {op!r}")
    stride = model.config.total_stride
    if model.config.shift_average and stride > 1:
        codes = backend.encode(batch, scales)  # the codes of the unshifted image
        out = backend.reconstruct(batch, scales)
        return [(out[i], zero_count(codes[i], item.core, stride)) for i, item in enumerate(items)]

    def count(first: int, codes: np.ndarray) -> list[tuple[int, int]]:
        return [zero_count(c, items[first + j].core, stride) for j, c in enumerate(codes)]

    out, counts = backend.reconstruct_inspecting(batch, scales, count)
    return list(zip(out, (c for run in counts for c in run)))


def _earlier_stage_zeros(model, batch: np.ndarray, scales: np.ndarray, items: list[Work]) -> list:
    import torch

    with torch.inference_mode():
        codes = model.encode(torch.from_numpy(batch), torch.from_numpy(scales), all_stages=True)
    grids = np.cumprod([stage.stride for stage in model.config.stages])  # stage l's code grid, in pixels
    return [[zero_count(stage[i].numpy(), item.core, int(grid)) for stage, grid in zip(codes[:-1], grids)]
            for i, item in enumerate(items)]


def zero_count(codes: np.ndarray, core: tuple[int, int, int, int] | None, grid: int) -> tuple[int, int]:
    """(zero codes, codes) of ``(K, h, w)`` codes inside ``core`` (pixels, multiples of ``grid``)."""
    if core is not None:
        top, left, bottom, right = (v // grid for v in core)
        codes = codes[:, top:bottom, left:right]
    return int(codes.size - np.count_nonzero(codes)), int(codes.size)
