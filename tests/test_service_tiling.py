"""Large images in overlapping tiles: the result equals the untiled one, and the margin is what makes it so."""

import asyncio

import numpy as np
import pytest
import torch

from csc_serve.models import CSCAutoencoder, load_pretrained
from csc_serve.service.engine import Engine
from csc_serve.service.settings import ServeSettings
from csc_serve.service.tiling import TILE_TOLERANCE, plan_tiles, receptive_margin

from .conftest import tiny_config

TILE = 16  # tiny tiles, so a 70x90 image makes 30 of them
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=[{}, {"shift_average": True, "nonnegative": False}],
                ids=["plain", "shift-average"])
def engines(request, tmp_path_factory):
    """The same tiny strided model served untiled and in TILE x TILE tiles."""
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    CSCAutoencoder(tiny_config(**request.param)).eval().save_pretrained(directory)
    untiled = Engine(ServeSettings(model=str(directory), backend="torch", batch_wait_ms=0)).start(background=False)
    tiled = Engine(ServeSettings(model=str(directory), backend="torch", batch_wait_ms=0, tile_size=TILE))
    tiled.start(background=False)
    yield untiled, tiled
    untiled.close()
    tiled.close()


def image(height=70, width=91, seed=0):
    return np.random.default_rng(seed).random((3, height, width), dtype=np.float32)


def test_the_margin_is_the_receptive_field_of_the_unrolled_model():
    # 9x9 atoms on a stride-4 grid, 4 steps: 7 * 4 + 4 pixels, 1x1 atoms add none, the shifts 4 more.
    assert receptive_margin(load_pretrained("csc-ctrl-rgb").config) == 36
    assert receptive_margin(tiny_config()) == 22  # 7 * 2 + 2, then (5 * 1 + 1) on the stride-1 grid
    assert receptive_margin(tiny_config(shift_average=True)) == 24
    assert receptive_margin(tiny_config(padding_mode="circular")) == 22


def test_tiles_cover_the_image_once_and_start_on_the_stride_grid():
    tiles = plan_tiles(70, 92, tile_size=15, margin=6, stride=2)
    covered = np.zeros((70, 92), int)
    for tile in tiles:
        top, left, bottom, right = tile.core
        covered[top:bottom, left:right] += 1
        assert top % 2 == 0 and left % 2 == 0 and tile.source[0] % 2 == 0 and tile.source[1] % 2 == 0
        assert tile.source[0] == max(0, top - 6) and tile.source[2] == min(70, bottom + 6)
    assert (covered == 1).all()


def test_tiled_reconstruction_equals_the_untiled_one(engines):
    untiled, tiled = engines
    x = image()
    whole = asyncio.run(untiled.reconstruct(x, 1.5))
    parts = asyncio.run(tiled.reconstruct(x, 1.5))
    assert parts.image.shape == x.shape
    np.testing.assert_allclose(parts.image, whole.image, atol=TILE_TOLERANCE, rtol=0)
    assert parts.sparsity == pytest.approx(whole.sparsity, abs=1e-3)
    denoised = asyncio.run(tiled.denoise(x, lmbda_scale=3.0)).image
    np.testing.assert_allclose(denoised, asyncio.run(untiled.denoise(x, lmbda_scale=3.0)).image,
                               atol=TILE_TOLERANCE, rtol=0)


def test_tiled_codes_equal_the_untiled_ones(engines):
    untiled, tiled = engines
    x = image(height=67, width=80, seed=1)
    whole = asyncio.run(untiled.encode(x, 2.0))
    parts = asyncio.run(tiled.encode(x, 2.0))
    assert parts.codes.shape == whole.codes.shape == (8, 34, 40)
    np.testing.assert_allclose(parts.codes, whole.codes, atol=TILE_TOLERANCE, rtol=0)
    assert parts.sparsity == pytest.approx(whole.sparsity, abs=1e-3)


def test_a_smaller_margin_would_not_do(engines):
    """The equality above is the margin's doing: tiles with less context differ well beyond the tolerance."""
    untiled, tiled = engines
    x = image(seed=2)
    whole = asyncio.run(untiled.reconstruct(x, 1.0)).image
    margin = tiled.margin
    try:
        tiled.margin = 2
        cut = asyncio.run(tiled.reconstruct(x, 1.0)).image
    finally:
        tiled.margin = margin
    assert np.abs(cut - whole).max() > 100 * TILE_TOLERANCE


def test_circular_models_are_not_tiled(tmp_path):
    torch.manual_seed(0)
    CSCAutoencoder(tiny_config(padding_mode="circular")).save_pretrained(tmp_path / "m")
    engine = Engine(ServeSettings(model=str(tmp_path / "m"), backend="torch", tile_size=TILE)).start(background=False)
    sizes = []
    engine.batcher.observe = lambda size, waits, seconds: sizes.append(size)
    x = image(height=40, width=40)
    result = asyncio.run(engine.reconstruct(x))
    assert result.image.shape == x.shape and sizes == [1]  # one call for the whole image
    engine.close()
