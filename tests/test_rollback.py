"""Training that survives a divergent step: the probe, the roll-back to the last good state with halved learning
rates, its record in checkpoints; and the rebalanced threshold factors a run from another model starts with."""

from __future__ import annotations

import json
import math

import pytest
import torch

from csc_serve.models import CSCAutoencoder, StageConfig, load_pretrained
from csc_serve.training.data import ImageFolderDataset, list_images
from csc_serve.training.presets import PRESETS
from csc_serve.training.run import train
from csc_serve.training.trainer import Trainer

from .conftest import tiny_config
from .test_training import tiny_run, write_image_folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data"))


def _trainer(data_dir, tmp_path, **overrides) -> Trainer:
    torch.manual_seed(0)
    model = CSCAutoencoder(PRESETS["tiny"]).train()
    config = tiny_run(data_dir, tmp_path / "run", **{"rollback_every": 2, **overrides})
    paths = list_images(data_dir)
    holdout = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    return Trainer(model, config, ImageFolderDataset(paths, 3, crop_size=16, seed=0), holdout)


def test_a_probe_that_got_worse_brings_back_the_last_good_state_with_half_the_learning_rate(data_dir, tmp_path):
    trainer = _trainer(data_dir, tmp_path)
    trainer.train_step(0)
    trainer.step = 1
    assert trainer.guard.after_step(1) == {}  # not a probe step
    trainer.train_step(1)
    good = trainer.guard.after_step(2)
    assert set(good) == {"probe_loss"} and math.isfinite(good["probe_loss"])
    kept = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    kept_knots = trainer.calibration.knots()
    trainer.train_step(2)
    with torch.no_grad():  # a step that breaks the model: atoms blown up, FISTA's step far too long
        trainer.model.stages[0].dictionary.mul_(30.0)
    bad = trainer.guard.after_step(4)
    assert bad["rolled_back"] == 1.0 and bad["probe_loss"] > good["probe_loss"] + trainer.config.rollback_tolerance
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, kept[name], rtol=0, atol=0)
    assert trainer.calibration.knots() == kept_knots
    assert trainer.lr_factor == 0.5 and trainer.guard.rollbacks == 1
    assert trainer.guard.probe_loss() == pytest.approx(good["probe_loss"], abs=1e-6)
    trainer._set_learning_rates(3)
    rates = [g["lr"] / g["initial_lr"] for g in trainer.optimizers["game"].param_groups]
    trainer.lr_factor = 1.0
    trainer._set_learning_rates(3)
    full = [g["lr"] / g["initial_lr"] for g in trainer.optimizers["game"].param_groups]
    assert rates == pytest.approx([0.5 * f for f in full])
    # A second failure halves again, from the state kept before the first.
    trainer.lr_factor = 0.5
    with torch.no_grad():
        trainer.model.stages[0].dictionary.mul_(30.0)
    assert trainer.guard.after_step(6)["rolled_back"] == 1.0 and trainer.lr_factor == 0.25


def test_a_healthy_run_never_rolls_back_and_probing_can_be_turned_off(data_dir, tmp_path):
    trainer = _trainer(data_dir, tmp_path, iterations=6)
    for step in range(6):
        trainer.train_step(step)
        trainer.guard.after_step(step + 1)
    assert trainer.guard.rollbacks == 0 and trainer.lr_factor == 1.0 and trainer.guard.snapshot is not None
    off = _trainer(data_dir, tmp_path, rollback_every=0)
    assert not off.guard.active and off.guard.after_step(2) == {}


def test_roll_backs_are_logged_and_a_resumed_run_keeps_their_learning_rate(data_dir, tmp_path):
    out = train(tiny_run(data_dir, tmp_path / "m", iterations=4, rollback_every=2), PRESETS["tiny"], progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rollbacks"] == 0 and math.isfinite(r["probe_loss"]) for r in records)
    state_path = out / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    assert state["lr_factor"] == 1.0 and state["rollbacks"] == 0 and math.isfinite(state["probe_best"])
    state["lr_factor"], state["rollbacks"] = 0.25, 2
    state_path.write_text(json.dumps(state))
    train(tiny_run(data_dir, tmp_path / "m", iterations=6, rollback_every=2), resume=True, progress=False)
    again = json.loads(state_path.read_text())
    assert again["lr_factor"] == 0.25 and again["rollbacks"] == 2 and again["step"] == 6


def test_rebalanced_thresholds_compute_the_same_model_with_factors_of_mean_one():
    torch.manual_seed(0)
    model = CSCAutoencoder(tiny_config(stages=(
        StageConfig(num_atoms=6, kernel_size=5, stride=2, lmbda=0.05, num_steps=4, learned_steps=True,
                    thresholds="noise_affine"),
        StageConfig(num_atoms=8, kernel_size=1, stride=1, lmbda=0.05, num_steps=3),
    ), nonnegative=False, shift_average=True)).eval()
    with torch.no_grad():
        first, second = model.stages
        first.lmbda_weights.copy_(torch.rand(6) * 900 + 100)
        first.threshold_scales.copy_(torch.rand(4, 6) * 0.02)
        first.threshold_slopes.copy_(torch.randn(4, 6) * 0.1)
        second.lmbda_weights.copy_(torch.rand(8) * 5)
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.0, 30.0])
    with torch.no_grad():
        before = model.reconstruct(images, 1.5, sigma=sigma)
        model.rebalance_thresholds()
        after = model.reconstruct(images, 1.5, sigma=sigma)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    for stage, config in zip(model.stages, model.config.stages):
        assert float(stage.lmbda_weights.detach().mean()) == pytest.approx(1.0)
        assert config.lmbda == stage.lmbda != 0.05
    assert float(model.stages[0].threshold_scales.detach().mean()) == pytest.approx(1.0)


def test_a_run_from_another_model_starts_rebalanced_and_keeps_its_lmbda(data_dir, tmp_path):
    torch.manual_seed(0)
    source = CSCAutoencoder(PRESETS["tiny"])
    with torch.no_grad():
        source.stages[0].lmbda_weights.fill_(40.0)
    source.save_pretrained(tmp_path / "source")
    out = train(tiny_run(data_dir, tmp_path / "m", iterations=2, lr=1e-12, lr_thresholds=0.0, lr_calibration=0.0),
                init=str(tmp_path / "source"), progress=False)
    trained = load_pretrained(out)
    assert float(trained.stages[0].lmbda_weights.detach().mean()) == pytest.approx(1.0, rel=1e-6)
    assert trained.config.stages[0].lmbda == pytest.approx(40.0 * PRESETS["tiny"].stages[0].lmbda)
