"""Large images in overlapping tiles: the result equals the untiled one, and the margin is what makes it so."""

import asyncio

import numpy as np
import pytest
import torch

from csc_serve.models import CSCAutoencoder, StageConfig, load_pretrained
from csc_serve.models.grow import deepen
from csc_serve.service.engine import Engine
from csc_serve.service.settings import ServeSettings
from csc_serve.service.tiling import TILE_TOLERANCE, plan_tiles, receptive_margin

from .conftest import tiny_config

TILE = 16  # tiny tiles, so a 70x90 image makes 30 of them
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def windowed_config():
    """Both stages with per-atom thresholds set per position by 3x3 neighbourhoods of codes."""
    def stage(atoms, kernel, stride, steps):
        return StageConfig(num_atoms=atoms, kernel_size=kernel, stride=stride, lmbda=0.05, num_steps=steps,
                           learned_steps=True, thresholds="per_atom", neighbourhood=3)
    return tiny_config(stages=(stage(6, 5, 1, 4), stage(8, 3, 2, 3)), shift_average=True, nonnegative=False)


def _windowed_model() -> CSCAutoencoder:
    torch.manual_seed(0)
    model = CSCAutoencoder(windowed_config()).eval()
    with torch.no_grad():
        for layer in model.stages:
            layer.threshold_exponents.copy_(torch.randn(layer.threshold_exponents.shape))
    return model


def _serve(model: CSCAutoencoder, directory):
    """``model`` served untiled and in TILE x TILE tiles."""
    model.save_pretrained(directory)
    untiled = Engine(ServeSettings(model=str(directory), backend="torch", batch_wait_ms=0)).start(background=False)
    tiled = Engine(ServeSettings(model=str(directory), backend="torch", batch_wait_ms=0, tile_size=TILE))
    tiled.start(background=False)
    return untiled, tiled


@pytest.fixture(scope="module", params=[{}, {"shift_average": True, "nonnegative": False}, "neighbourhood"],
                ids=["plain", "shift-average", "neighbourhood"])
def engines(request, tmp_path_factory):
    """The same tiny strided model served untiled and in TILE x TILE tiles."""
    torch.manual_seed(0)
    if request.param == "neighbourhood":
        model = _windowed_model()
    else:
        model = CSCAutoencoder(tiny_config(**request.param)).eval()
    untiled, tiled = _serve(model, tmp_path_factory.mktemp("model"))
    yield untiled, tiled
    untiled.close()
    tiled.close()


def image(height=70, width=91, seed=0):
    return np.random.default_rng(seed).random((3, height, width), dtype=np.float32)


def test_the_margin_is_the_receptive_field_of_the_unrolled_model():
    # 9x9 atoms on a stride-4 grid, 4 steps: 7 * 4 + 4 pixels; 1x1 atoms add none, but their 8 steps read the
    # 3x3 codes around each code (8 * 4 pixels); the shifts 4 more.
    assert receptive_margin(load_pretrained("csc-ctrl-rgb").config) == 36 + 32
    assert receptive_margin(tiny_config()) == 22  # 7 * 2 + 2, then (5 * 1 + 1) on the stride-1 grid
    assert receptive_margin(tiny_config(shift_average=True)) == 24
    assert receptive_margin(tiny_config(padding_mode="circular")) == 22
    # Each step's thresholds read one code further each way: 4 x 1 pixel in stage 1, 3 x 2 in stage 2.
    assert receptive_margin(windowed_config()) == 24 + 4 + 6


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


def test_the_neighbourhoods_need_their_share_of_the_margin(tmp_path):
    """At the margin of the same model without neighbourhoods, the plain model's tiles are exact to the bit and
    the neighbourhood model's are not: its thresholds read codes beyond that field (the differences fade fast
    with the distance, so the test asks for exactness, not for a size)."""
    x = image(seed=3)
    for name, model in (("plain", deepen(deepen(_windowed_model(), 0, neighbourhood=0), 1, neighbourhood=0)),
                        ("neighbourhood", _windowed_model())):
        untiled, tiled = _serve(model, tmp_path / name)
        try:
            whole = asyncio.run(untiled.reconstruct(x, 1.0)).image
            np.testing.assert_array_equal(asyncio.run(tiled.reconstruct(x, 1.0)).image, whole)
            tiled.margin = receptive_margin(windowed_config()) - 4 - 6  # without the neighbourhoods' share
            cut = asyncio.run(tiled.reconstruct(x, 1.0)).image
        finally:
            untiled.close()
            tiled.close()
        assert (np.abs(cut - whole).max() > 0) == (name == "neighbourhood")


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
