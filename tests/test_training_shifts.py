"""Training the shift average a shift-averaged model serves (``train_shifts``), and learned steps in training."""

from __future__ import annotations

import json

import pytest
import torch

from csc_serve.models import CSCAutoencoder, StageConfig, fista_form, load_pretrained
from csc_serve.models.autoencoder import shifted_copies, sum_of_unshifted
from csc_serve.training.data import ImageFolderDataset, list_images
from csc_serve.training.run import train
from csc_serve.training.trainer import Trainer

from .conftest import tiny_config
from .test_training import tiny_run, write_image_folder


def _shifted_model(learned: bool = False) -> CSCAutoencoder:
    torch.manual_seed(0)
    stages = (StageConfig(num_atoms=8, kernel_size=5, stride=2, lmbda=0.05, num_steps=3, learned_steps=learned),
              StageConfig(num_atoms=6, kernel_size=1, stride=1, lmbda=0.05, num_steps=2, learned_steps=learned))
    return CSCAutoencoder(tiny_config(stages=stages, nonnegative=False, shift_average=True))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data"))


def _trainer(model, data_dir, tmp_path, **overrides) -> Trainer:
    config = tiny_run(data_dir, tmp_path, **overrides)
    crops = ImageFolderDataset(list_images(data_dir), 3, crop_size=config.crop_size, seed=config.seed)
    return Trainer(model, config, crops, None)


def test_the_mean_over_every_shift_is_what_reconstruct_serves():
    model = _shifted_model().eval()
    x = torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(1))
    s = model.config.total_stride
    shifts = [(dy, dx) for dy in range(s) for dx in range(s)]
    with torch.no_grad(), fista_form("training"):
        out = model.decode(model.encode(shifted_copies(x, shifts, s), 1.5))
        mean = sum_of_unshifted(out, shifts, (12, 10)) / len(shifts)
        torch.testing.assert_close(mean, model.reconstruct(x, 1.5))


def test_each_step_draws_distinct_shifts_from_the_seed_and_the_step(data_dir, tmp_path):
    model = _shifted_model()
    trainer = _trainer(model, data_dir, tmp_path, train_shifts=3)
    draws = [trainer._shifts(step) for step in range(6)]
    assert all(len(set(d)) == 3 and all(0 <= v < 2 for p in d for v in p) for d in draws)
    assert draws == [trainer._shifts(step) for step in range(6)]
    assert len({tuple(d) for d in draws}) > 1
    # More shifts than the grid has: every shift once; a model without shift averaging: none.
    assert sorted(_trainer(model, data_dir, tmp_path, train_shifts=9)._shifts(0)) == [
        (0, 0), (0, 1), (1, 0), (1, 1)]
    plain = CSCAutoencoder(tiny_config())
    assert _trainer(plain, data_dir, tmp_path, train_shifts=4)._shifts(0) == []


def test_a_step_with_shifts_trains_the_shift_mean(data_dir, tmp_path):
    model = _shifted_model()
    trainer = _trainer(model, data_dir, tmp_path, train_shifts=4, rate_weight=0.0)
    x, sigma, noisy = trainer._batch(0, None)
    shifts = trainer._shifts(0)
    with torch.no_grad(), fista_form("training"):
        s = model.config.total_stride
        scale = trainer.calibration(sigma).repeat(len(shifts))
        out = model.decode(model.encode(shifted_copies(noisy, shifts, s), scale))
        mean = (sum_of_unshifted(out, shifts, tuple(x.shape[-2:])) / len(shifts)).clamp(0, 1)
        expected = (-10 * torch.log10((mean - x).pow(2).flatten(1).mean(1))).mean()
    metrics = trainer.train_step(0)
    # train_psnr is measured on the clipped mean reconstruction of the step, before the update: the same
    # numbers up to the rounding of the training form against this one (far below 1e-3 dB).
    assert metrics["train_psnr"] == pytest.approx(float(expected), abs=1e-3)


def test_a_run_with_learned_steps_and_shifts_learns_the_scales(data_dir, tmp_path):
    arch = _shifted_model(learned=True).config
    out = train(tiny_run(data_dir, tmp_path / "m", train_shifts=4, iterations=6), model_config=arch, progress=False)
    model = load_pretrained(out)
    assert all(stage.learned_steps for stage in model.stages)
    assert any(float((stage.step_scales - 1).abs().max()) > 1e-4 for stage in model.stages)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"]["provenance"]["train_config"]["train_shifts"] == 4
