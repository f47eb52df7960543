"""Image folders for training and evaluation, read with Pillow.

Every image becomes a float32 array ``(C, H, W)`` in [0, 1] with the model's channel count: palette and
alpha images are flattened (alpha composited onto white), 16-bit and 32-bit integer images are scaled by
their own range, greyscale is replicated to RGB and RGB is converted to luma (ITU-R 601) for grey models.
EXIF orientation is applied. A file that Pillow cannot decode raises ``ImageReadError`` naming the path.

``ImageFolderDataset`` yields random crops with random flips. The crop of item ``i`` in epoch ``e`` is drawn
from ``numpy.random.default_rng([seed, e, i])``: the same seed gives the same crops on every run, on any
number of workers, in any order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["IMAGE_SUFFIXES", "ImageReadError", "ImageFolderDataset", "list_images", "load_image", "split_paths"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImageReadError(ValueError):
    """An image file that could not be read or converted; the message starts with its path."""


def list_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (by suffix, case-insensitive), sorted; an error if there are none."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    found = root.rglob("*") if recursive else root.iterdir()
    paths = sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def _to_float(image: Image.Image) -> np.ndarray:
    """A decoded image as float32 (H, W) or (H, W, C) in [0, 1], whatever its mode."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "RGBA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    if image.mode == "1":
        image = image.convert("L")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(image, dtype=np.float32) / 65535.0
    if image.mode == "I":
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max(initial=0) > 255 else 255.0
        return np.clip(array / top, 0, 1).astype(np.float32)
    if image.mode == "F":
        return np.clip(np.asarray(image, dtype=np.float32), 0, 1)
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV
    return np.asarray(image, dtype=np.float32) / 255.0


def load_image(path: str | Path, channels: int = 3) -> np.ndarray:
    """Read ``path`` as float32 ``(channels, H, W)`` in [0, 1]; ``channels`` is 1 (grey) or 3 (RGB)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            array = _to_float(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: cannot read image ({exc})") from None
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    if array.shape[0] == channels:
        return np.ascontiguousarray(array)
    if channels == 3:
        return np.ascontiguousarray(np.repeat(array, 3, axis=0))
    luma = np.tensordot(np.array([0.299, 0.587, 0.114], dtype=np.float32), array, axes=1)
    return np.ascontiguousarray(luma[None])


def split_paths(paths: Sequence[Path], holdout_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """A seeded split into (train, holdout); the holdout is empty for fraction 0, train never is."""
    if not 0 <= holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    order = np.random.default_rng(seed).permutation(len(paths))
    count = min(int(round(holdout_fraction * len(paths))), len(paths) - 1)
    holdout = sorted(paths[i] for i in order[:count])
    train = sorted(paths[i] for i in order[count:])
    return train, holdout


class ImageFolderDataset(torch.utils.data.Dataset):
    """Random ``crop_size`` crops (and flips) of a list of images, as float32 tensors ``(C, S, S)``.

    Images smaller than the crop are padded by reflection. ``cache`` keeps decoded images in memory (the
    default: training sets here are small). Call ``set_epoch`` to draw new crops.
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
        self.epoch = 0
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def image(self, index: int) -> np.ndarray:
        if self._cache is None:
            return load_image(self.paths[index], self.channels)
        if index not in self._cache:
            self._cache[index] = load_image(self.paths[index], self.channels)
        return self._cache[index]

    def __getitem__(self, index: int) -> torch.Tensor:
        array = self.image(index)
        if self.crop_size is None:
            return torch.from_numpy(array.copy())
        rng = np.random.default_rng([self.seed, self.epoch, index])
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
