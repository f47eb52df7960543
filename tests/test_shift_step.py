"""``shift_step``: a shift-averaged model that averages the shifts of a coarser grid, for less reconstruct work."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch

from csc_serve.export import export_onnx
from csc_serve.export.flops import config_flops
from csc_serve.models import ConfigError, CSCAutoencoder, CSCConfig, StageConfig, fista_form
from csc_serve.models.autoencoder import shifted_copies, sum_of_unshifted
from csc_serve.models.serialization import weights_sha256
from csc_serve.training.data import ImageFolderDataset, list_images
from csc_serve.training.trainer import Trainer

from .conftest import tiny_config
from .test_training import tiny_run, write_image_folder


def _config(shift_step: int = 1, shift_pattern: str = "grid") -> CSCConfig:
    stages = (StageConfig(num_atoms=6, kernel_size=5, stride=2, lmbda=0.05, num_steps=3),
              StageConfig(num_atoms=8, kernel_size=3, stride=2, lmbda=0.05, num_steps=2))
    return tiny_config(stages=stages, nonnegative=False, shift_average=True, shift_step=shift_step,
                       shift_pattern=shift_pattern)


def _model(shift_step: int, shift_pattern: str = "grid") -> CSCAutoencoder:
    torch.manual_seed(0)
    return CSCAutoencoder(_config(shift_step, shift_pattern)).eval()


def test_shifts_follow_the_step_and_every_shift_is_the_default():
    assert _config().shifts == [(dy, dx) for dy in range(4) for dx in range(4)]
    assert _config(2).shifts == [(0, 0), (0, 2), (2, 0), (2, 2)]
    assert _config(4).shifts == [(0, 0)]
    assert tiny_config().shifts == [(0, 0)]  # no shift averaging


def test_the_quincunx_pattern_keeps_the_checkerboard_of_the_grid():
    assert _config(1, "quincunx").shifts == [(0, 0), (0, 2), (1, 1), (1, 3), (2, 0), (2, 2), (3, 1), (3, 3)]
    assert _config(2, "quincunx").shifts == [(0, 0), (2, 2)]
    # Every row and every column of the grid still holds shifts: each pixel sees two grid phases per axis.
    shifts = _config(1, "quincunx").shifts
    assert {dy for dy, _ in shifts} == set(range(4)) and {dx for _, dx in shifts} == set(range(4))


@pytest.mark.parametrize("change,message", [
    (dict(shift_step=3), "divide the total stride 4"),
    (dict(shift_step=0), "shift_step"),
    (dict(shift_step=2, shift_average=False), "needs shift_average"),
    (dict(shift_step=True), "shift_step"),
    (dict(shift_pattern="hexagonal"), "shift_pattern must be one of"),
    (dict(shift_pattern="quincunx", shift_step=4), "an even number of grid shifts per axis"),
    (dict(shift_pattern="quincunx", shift_average=False), "needs shift_average"),
])
def test_a_step_that_is_no_divisor_of_the_stride_is_refused(change, message):
    data = {**_config().to_dict(), **change}
    with pytest.raises(ConfigError, match=message):
        CSCConfig.from_dict(data)


def test_the_step_is_written_only_where_set_and_survives_a_round_trip(tmp_path):
    assert "shift_step" not in _config().to_dict() and "shift_pattern" not in _config().to_dict()
    assert CSCConfig.from_dict(_config(2).to_dict()) == _config(2)
    assert _config(1, "quincunx").to_dict()["shift_pattern"] == "quincunx"
    assert CSCConfig.from_dict(_config(1, "quincunx").to_dict()) == _config(1, "quincunx")
    model = _model(2)
    model.save_pretrained(tmp_path / "m")
    assert CSCAutoencoder.from_pretrained(tmp_path / "m").config.shifts == [(0, 0), (0, 2), (2, 0), (2, 2)]


@pytest.mark.parametrize("shift_step,shift_pattern", [(2, "grid"), (1, "quincunx")])
def test_reconstruct_is_the_mean_over_the_coarser_grid(shift_step, shift_pattern):
    coarse, full = _model(shift_step, shift_pattern), _model(1)
    x = torch.rand(2, 3, 13, 10, generator=torch.Generator().manual_seed(1))
    shifts = coarse.config.shifts
    with torch.no_grad(), fista_form("training"):
        out = coarse.decode(coarse.encode(shifted_copies(x, shifts, 4), 1.5))
        expected = sum_of_unshifted(out, shifts, (13, 10)) / len(shifts)
        torch.testing.assert_close(coarse.reconstruct(x, 1.5), expected)
        # Same weights, other shifts: another (and cheaper) average.
        assert (coarse.reconstruct(x, 1.5) - full.reconstruct(x, 1.5)).abs().max() > 1e-4


def test_flops_count_the_copies_of_the_coarser_grid():
    full = config_flops(_config(), "reconstruct", 1, 64, 64)
    assert config_flops(_config(2), "reconstruct", 1, 64, 64) * 4 == full
    assert config_flops(_config(2), "encode", 1, 64, 64) == config_flops(_config(), "encode", 1, 64, 64)
    assert config_flops(_config(1, "quincunx"), "reconstruct", 1, 64, 64) * 2 == full


@pytest.mark.parametrize("shift_step,shift_pattern,copies", [(2, "grid", 4), (1, "quincunx", 8)])
def test_the_exported_reconstruct_graph_averages_the_coarser_grid(tmp_path, shift_step, shift_pattern, copies):
    model = _model(shift_step, shift_pattern)
    manifest = export_onnx(model, tmp_path, weights_sha256=weights_sha256(model), graphs=("reconstruct",))
    assert manifest["model"]["shifts"] == copies
    session = ort.InferenceSession(str(tmp_path / manifest["onnx"]["graphs"]["reconstruct"]["file"]),
                                   providers=["CPUExecutionProvider"])
    images = torch.rand(2, 3, 16, 12, generator=torch.Generator().manual_seed(6))
    scale = torch.tensor([0.7, 2.5])
    with torch.no_grad():
        expected = model.reconstruct(images, scale).numpy()
    names = [i.name for i in session.get_inputs()]
    np.testing.assert_allclose(session.run(None, dict(zip(names, [images.numpy(), scale.numpy()])))[0],
                               expected, atol=1e-4)


def test_training_draws_its_shifts_from_the_coarser_grid(tmp_path):
    data_dir = write_image_folder(tmp_path / "data")
    config = tiny_run(data_dir, tmp_path / "run", train_shifts=3)
    crops = ImageFolderDataset(list_images(data_dir), 3, crop_size=config.crop_size, seed=config.seed)
    grid = set(_config(2).shifts)
    trainer = Trainer(_model(2), config, crops, None)
    assert all(len(trainer._shifts(step)) == 3 and set(trainer._shifts(step)) <= grid for step in range(5))
    every = Trainer(_model(2), dataclasses.replace(config, train_shifts=16), crops, None)
    assert sorted(every._shifts(0)) == sorted(grid)
