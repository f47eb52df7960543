"""Image folders: every Pillow mode read into the model's channels, seeded crops, the held-out split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from csc_serve.training.data import ImageFolderDataset, ImageReadError, list_images, load_image, split_paths


def _rgb(h: int = 20, w: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_png_read_exactly(tmp_path):
    pixels = _rgb()
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", 3)
    assert out.shape == (3, 20, 24) and out.dtype == np.float32
    np.testing.assert_array_equal(out, pixels.transpose(2, 0, 1) / np.float32(255))


def test_grey_replicated_to_rgb_and_rgb_to_luma(tmp_path):
    grey = _rgb()[..., 0]
    Image.fromarray(grey).save(tmp_path / "g.png")
    rgb = load_image(tmp_path / "g.png", 3)
    assert rgb.shape == (3, 20, 24)
    np.testing.assert_array_equal(rgb[0], rgb[2])
    Image.fromarray(_rgb()).save(tmp_path / "c.png")
    luma = load_image(tmp_path / "c.png", 1)
    expected = np.tensordot([0.299, 0.587, 0.114], _rgb().transpose(2, 0, 1) / 255.0, axes=1)
    np.testing.assert_allclose(luma[0], expected, atol=1e-6)  # float32 rounding


def test_palette_image_matches_its_rgb(tmp_path):
    rgb = Image.fromarray(_rgb())
    rgb.quantize(16).save(tmp_path / "p.png")
    expected = np.asarray(Image.open(tmp_path / "p.png").convert("RGB")).transpose(2, 0, 1) / 255.0
    np.testing.assert_allclose(load_image(tmp_path / "p.png", 3), expected, atol=1e-7)


def test_alpha_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red
    rgba[:2, :, 3] = 255  # top half opaque, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", 3)
    np.testing.assert_array_equal(out[:, 0, 0], [1, 0, 0])
    np.testing.assert_array_equal(out[:, 3, 0], [1, 1, 1])


def test_sixteen_bit_scaled_by_its_range(tmp_path):
    values = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    out = load_image(tmp_path / "d.png", 1)
    np.testing.assert_allclose(out[0], values / 65535.0, rtol=1e-6)


@pytest.mark.parametrize("suffix", [".jpg", ".bmp", ".tif"])
def test_other_formats(tmp_path, suffix):
    Image.fromarray(_rgb()).save(tmp_path / f"x{suffix}")
    out = load_image(tmp_path / f"x{suffix}", 3)
    tolerance = 0.25 if suffix == ".jpg" else 1e-7  # JPEG is lossy on random pixels; float32 rounding
    assert np.abs(out - _rgb().transpose(2, 0, 1) / 255.0).mean() <= tolerance


def test_exif_orientation_applied(tmp_path):
    image = Image.fromarray(_rgb(10, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg", 3).shape == (3, 30, 10)


def test_unreadable_file_names_its_path(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImageReadError, match="broken.png"):
        load_image(bad)
    with pytest.raises(ValueError, match="channels"):
        load_image(bad, 2)


def test_list_images_by_suffix_sorted_and_errors(tmp_path):
    for name in ("b.PNG", "a.jpg", "sub/c.tiff", "notes.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    names = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert names == ["a.jpg", "b.PNG", "sub/c.tiff"]
    assert len(list_images(tmp_path, recursive=False)) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        list_images(tmp_path / "missing")


@pytest.fixture
def folder(tmp_path):
    for i in range(5):
        Image.fromarray(_rgb(40 + i, 50, seed=i)).save(tmp_path / f"{i}.png")
    return list_images(tmp_path)


def test_crops_seeded_and_change_with_epoch(folder):
    a = ImageFolderDataset(folder, crop_size=16, seed=3)
    b = ImageFolderDataset(folder, crop_size=16, seed=3, cache=False)
    first = [a.crop(i, 0) for i in range(5)]
    assert all(x.shape == (3, 16, 16) and x.dtype == torch.float32 for x in first)
    assert all(torch.equal(x, b.crop(i, 0)) for i, x in enumerate(first))
    assert all(torch.equal(a.crop(i, 0), a.crop(i, 0)) for i in range(5))  # the same item twice in one epoch
    assert not all(torch.equal(x, a.crop(i, 1)) for i, x in enumerate(first))
    other = ImageFolderDataset(folder, crop_size=16, seed=4)
    assert not all(torch.equal(x, other.crop(i, 0)) for i, x in enumerate(first))


def test_crops_are_windows_of_the_image(folder):
    data = ImageFolderDataset(folder, crop_size=12, flips=False)
    full = torch.from_numpy(load_image(folder[0]))
    crop = data.crop(0, 0)
    windows = full.unfold(1, 12, 1).unfold(2, 12, 1)  # (3, H-11, W-11, 12, 12)
    match = (windows == crop[:, None, None]).flatten(3).all(-1).all(0)
    assert match.any()


def test_small_images_padded_and_whole_images(folder):
    data = ImageFolderDataset(folder, crop_size=64)
    assert data.crop(0, 0).shape == (3, 64, 64)
    whole = ImageFolderDataset(folder, crop_size=None)
    assert whole.crop(2, 0).shape == (3, 42, 50)
    with pytest.raises(ValueError):
        ImageFolderDataset([], crop_size=8)


def test_split_is_seeded_disjoint_and_complete(folder):
    train, held = split_paths(folder, 0.4, seed=1)
    assert len(held) == 2 and sorted(train + held) == sorted(folder) and not set(train) & set(held)
    assert split_paths(folder, 0.4, seed=1) == (train, held)
    assert split_paths(folder, 0.0, seed=1) == (sorted(folder), [])
    assert len(split_paths(folder[:1], 0.9, seed=0)[0]) == 1  # never an empty training set


def test_serving_reads_images_without_importing_training(tmp_path):
    """Files and uploads are read by csc_serve.models.images; training.data re-exports it for training code."""
    import subprocess
    import sys

    from csc_serve.models import images
    from csc_serve.training import data

    assert data.load_image is images.load_image and data.ImageReadError is images.ImageReadError
    Image.fromarray(_rgb(6, 4)).save(tmp_path / "x.png")
    code = (
        "import io, sys\n"
        "from csc_serve.service.payloads import read_image\n"
        "import csc_serve.extract, csc_serve.bench.backends\n"
        f"data = open({str(tmp_path / 'x.png')!r}, 'rb').read()\n"
        "print(read_image(data, 1, 100).shape, 'csc_serve.training' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == "(1, 6, 4) False"
