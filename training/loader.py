r"""Training batches: item ``step`` of ``StepBatches`` is the whole batch of that step, built on CPU.

Every draw of a batch comes from the seed, the step and the process rank alone::

    rng    = numpy.random.default_rng([seed, step, rank])
    images = rng.integers(0, n, B)                                            # which of the n training images
    sigma  = rng.uniform(0, sigma_max, B) * (rng.random(B) >= clean_fraction)  # (B,), 0..255 scale, some 0
    clean  = stack(crop(image_i, epoch=step))                                  # (B, C, S, S)
    noisy  = clean + sigma / 255 * randn(Generator(seed * 1_000_003 + step * 101 + rank))

so a batch is the same whichever process or ``DataLoader`` worker builds it, in whatever order, and a loader
whose sampler starts at step ``k`` continues a run exactly from there. The noise is added on CPU in the
workers: the device receives ``clean`` and ``noisy`` (and ``sigma``), the two images the step needs.
"""

from __future__ import annotations

import os
import signal
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data import ImageFolderDataset

__all__ = ["StepBatch", "StepBatches", "batch_loader", "default_workers"]


def default_workers() -> int:
    """``min(4, cpus - 1)``, at least 0: one core stays with the training process, and a few workers already
    crop and add noise faster than a step trains (more only cost memory and start-up time)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(min(4, cpus - 1), 0)


class StepBatch(NamedTuple):
    """The batch of one step: ``clean`` and ``noisy`` ``(B, C, S, S)`` (noisy unclipped), ``sigma`` ``(B,)``."""

    step: int
    clean: torch.Tensor
    sigma: torch.Tensor
    noisy: torch.Tensor

    def to(self, device: torch.device) -> StepBatch:
        """The same batch on ``device``; copies from pinned memory run asynchronously."""
        move = [t.to(device, non_blocking=True) for t in (self.clean, self.sigma, self.noisy)]
        return StepBatch(self.step, *move)


class StepBatches(Dataset):
    """Item ``step`` is the ``StepBatch`` of that step for process ``rank`` (see the module docstring)."""

    def __init__(self, images: ImageFolderDataset, batch_size: int, sigma_max: float, clean_fraction: float,
                 seed: int, rank: int = 0):
        self.images, self.batch_size, self.seed, self.rank = images, batch_size, seed, rank
        self.sigma_max, self.clean_fraction = sigma_max, clean_fraction

    def __getitem__(self, step: int) -> StepBatch:
        b = self.batch_size
        rng = np.random.default_rng([self.seed, step, self.rank])
        indices = rng.integers(0, len(self.images), b)
        clean = torch.stack([self.images.crop(int(i), step) for i in indices])  # (B, C, S, S)
        sigma = rng.uniform(0, self.sigma_max, b) * (rng.random(b) >= self.clean_fraction)
        sigma = torch.from_numpy(sigma).float()  # (B,)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 101 + self.rank)
        noisy = clean + sigma.view(-1, 1, 1, 1) / 255.0 * torch.randn(clean.shape, generator=gen)
        return StepBatch(step, clean, sigma, noisy)


def _ignore_interrupts(worker_id: int) -> None:
    # Ctrl-C (and a job scheduler's SIGTERM) reaches every process of the group: the training process decides
    # when to stop (after its checkpoint) and then shuts the workers down itself; a worker that died first
    # would fail the step in flight. Workers still exit on their own when the training process is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def batch_loader(batches: StepBatches, start: int, stop: int, workers: int, pin_memory: bool) -> DataLoader:
    """The batches of steps ``start .. stop - 1`` in order, built by ``workers`` processes (0: in this one)."""
    return DataLoader(
        batches,
        batch_size=None,  # every item is already a whole batch
        sampler=range(start, stop),
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=_ignore_interrupts if workers else None,
        prefetch_factor=2 if workers else None,
        # Workers start from a clean server process, not as forks of this one: a fork copies the locks that
        # other threads (ONNX Runtime's, OpenMP's, a web server's) hold at that moment, and can crash.
        multiprocessing_context=_worker_context() if workers else None,
    )


def _worker_context():
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
