"""Image folders for training and evaluation.

Files are read by ``csc_serve.models.images`` (re-exported here): float32 arrays ``(C, H, W)`` in [0, 1]
with the model's channel count; a file that Pillow cannot decode raises ``ImageReadError`` naming the path.

``ImageFolderDataset`` yields random crops with random flips. The crop of item ``i`` in epoch ``e``
(``crop(i, e)``) is drawn from ``numpy.random.default_rng([seed, e, i])``: the same seed gives the same crops
on every run, on any number of workers, in any order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from csc_serve.models.images import IMAGE_SUFFIXES, ImageReadError, list_images, load_image

__all__ = ["IMAGE_SUFFIXES", "ImageReadError", "ImageFolderDataset", "list_images", "load_image", "split_paths"]


def split_paths(paths: Sequence[Path], holdout_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """A seeded split into (train, holdout); the holdout is empty for fraction 0, train never is."""
    if not 0 <= holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    order = np.random.default_rng(seed).permutation(len(paths))
    count = min(int(round(holdout_fraction * len(paths))), len(paths) - 1)
    holdout = sorted(paths[i] for i in order[:count])
    train = sorted(paths[i] for i in order[count:])
    return train, holdout


class ImageFolderDataset:
    """Random ``crop_size`` crops (and flips) of a list of images, as float32 tensors ``(C, S, S)``: ``crop(index,
    epoch)`` draws from the seed, the image and the epoch alone (the trainer's step batches pass the step).

    Images smaller than the crop are padded by reflection. ``cache`` keeps decoded images in memory (the
    default: training sets here are small).
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        channels: int = 3,
        crop_size: int | None = 64,
        flips: bool = True,
        seed: int = 0,
        cache: bool = True,
    ):
        if not paths:
            raise ValueError("no images given")
        if crop_size is not None and crop_size < 1:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        self.paths = [Path(p) for p in paths]
        self.channels, self.crop_size, self.flips, self.seed = channels, crop_size, flips, seed
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> np.ndarray:
        if self._cache is None:
            return load_image(self.paths[index], self.channels)
        if index not in self._cache:
            self._cache[index] = load_image(self.paths[index], self.channels)
        return self._cache[index]

    def crop(self, index: int, epoch: int) -> torch.Tensor:
        """The crop of image ``index`` in ``epoch`` (the whole image when ``crop_size`` is None), ``(C, S, S)``."""
        array = self.image(index)
        if self.crop_size is None:
            return torch.from_numpy(array.copy())
        rng = np.random.default_rng([self.seed, epoch, index])
        size = self.crop_size
        _, h, w = array.shape
        if h < size or w < size:
            ph, pw = max(size - h, 0), max(size - w, 0)
            mode = "reflect" if ph < h and pw < w else "edge"
            array = np.pad(array, ((0, 0), (0, ph), (0, pw)), mode=mode)
            _, h, w = array.shape
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        crop = array[:, top : top + size, left : left + size]
        if self.flips:
            if rng.random() < 0.5:
                crop = crop[:, :, ::-1]
            if rng.random() < 0.5:
                crop = crop[:, ::-1, :]
        return torch.from_numpy(np.ascontiguousarray(crop))
