"""Image files read with Pillow, for training, evaluation, serving and extraction alike.

Every image becomes a float32 array ``(C, H, W)`` in [0, 1] with the model's channel count: palette and
alpha images are flattened (alpha composited onto white), 16-bit and 32-bit integer images are scaled by
their own range, greyscale is replicated to RGB and RGB is converted to luma (ITU-R 601) for grey models.
EXIF orientation is applied. A file that Pillow cannot decode raises ``ImageReadError`` naming the path.
``to_float`` is the mode conversion alone, for images decoded elsewhere (the service's uploads). Two pieces of
geometry serve every array the same way, numpy or torch: ``center_crop``, and ``pad_to_stride``, the padding
every model, backend and tile gets before its strided convolutions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["IMAGE_SUFFIXES", "ImageReadError", "center_crop", "list_images", "load_image", "pad_to_stride",
           "to_float"]

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


def to_float(image: Image.Image) -> np.ndarray:
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
            array = to_float(image)
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


def center_crop(image, size: int):
    """The central ``size`` x ``size`` window of an array or tensor ``(..., H, W)`` (all of a shorter side)."""
    h, w = image.shape[-2:]
    top, left = max((h - size) // 2, 0), max((w - size) // 2, 0)
    return image[..., top : top + size, left : left + size]


def pad_to_stride(images, stride: int):
    """``images`` (..., H, W), a numpy array or a torch tensor of 3 or 4 dimensions, edge-padded at the bottom and
    right to multiples of ``stride`` (a copy only where padding is needed). Every model and backend pads so
    before its strided convolutions, and crops its results back."""
    h, w = images.shape[-2:]
    pad_h, pad_w = -h % stride, -w % stride
    if not (pad_h or pad_w):
        return images
    if isinstance(images, np.ndarray):
        return np.pad(images, [(0, 0)] * (images.ndim - 2) + [(0, pad_h), (0, pad_w)], mode="edge")
    import torch.nn.functional as F

    return F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")
