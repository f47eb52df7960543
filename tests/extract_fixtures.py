"""Small generated image collections and a saved tiny model for the feature extraction tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from csc_serve.models import CSCAutoencoder

from .conftest import tiny_config

SIZES = ((20, 24), (16, 16), (20, 24), (17, 23))  # repeated sizes share batches; odd ones get padded


def save_tiny_model(directory: Path) -> Path:
    torch.manual_seed(0)
    CSCAutoencoder(tiny_config()).eval().save_pretrained(directory)
    return directory


def make_images(root: Path, count: int = 10, bad: bool = True) -> list[str]:
    """``count`` seeded PNGs (RGB and grey, nested folders, a few sizes) and, with ``bad``, an unreadable
    ``broken.png`` and a truncated ``nested/cut.png``. Returns the readable ones' relative paths, sorted."""
    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        h, w = SIZES[i % len(SIZES)]
        relative = f"nested/deeper/img{i:02d}.png" if i % 3 == 0 else f"img{i:02d}.png"
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        (image.convert("L") if i % 4 == 1 else image).save(path)
        names.append(relative)
    if bad:
        (root / "broken.png").write_bytes(b"this is not a png")
        whole = (root / names[0]).read_bytes()
        (root / "nested" / "cut.png").write_bytes(whole[: len(whole) // 2])
    return sorted(names)


def assert_same_features(a: dict, b: dict) -> None:
    """Bit-identical features: same images, same shapes, same non-zeros, same values."""
    assert sorted(a) == sorted(b)
    for path in a:
        x, y = a[path], b[path]
        assert (x.height, x.width, x.shape) == (y.height, y.width, y.shape), path
        np.testing.assert_array_equal(x.indices, y.indices, err_msg=path)
        np.testing.assert_array_equal(x.values, y.values, err_msg=path)
        if x.pooled is None or y.pooled is None:
            assert x.pooled is None and y.pooled is None
        else:
            np.testing.assert_array_equal(x.pooled, y.pooled, err_msg=path)
