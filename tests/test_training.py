"""The closed-loop trainer end to end on tiny data: outputs, seeding, exact resume, torchrun with two processes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from csc_serve.models import CSCAutoencoder, CSCConfig, StageConfig, load_pretrained
from csc_serve.training.calibration import move_reconstruction_setting, sparsest_reconstruction_scale
from csc_serve.training.evaluate import evaluate_images
from csc_serve.training.presets import PRESETS
from csc_serve.training.run import train
from csc_serve.training.trainer import Calibration, TrainConfig, Trainer, init_dictionaries

ROOT = Path(__file__).resolve().parents[1]


def write_image_folder(folder: Path, count: int = 6, size: int = 40) -> Path:
    """Smooth gradients, a disc and a bar per image, different for each: small but image-like."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        rng = np.random.default_rng(i)
        base = rng.uniform(0.2, 0.8, 3)[:, None, None] + 0.3 * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))
        disc = (xx - rng.uniform(0.3, 0.7)) ** 2 + (yy - rng.uniform(0.3, 0.7)) ** 2 < 0.05
        image = np.where(disc, rng.uniform(0, 1, 3)[:, None, None], base)
        image[:, :, int(rng.integers(5, size - 5))] = 1.0
        pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data"))


def tiny_run(data_dir: Path, out: Path, **overrides) -> TrainConfig:
    """A few steps on CPU, where the tests of bit-identical results hold (CUDA kernels may be nondeterministic)."""
    fields = dict(
        data=str(data_dir), out=str(out), crop_size=16, batch_size=4, iterations=4, rate_batch=2,
        checkpoint_every=2, eval_every=2, eval_images=2, holdout_fraction=0.3, sigma_max=30.0, figures=False,
        device="cpu",
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def weights(out: Path) -> list[torch.Tensor]:
    return [s.dictionary.detach().clone() for s in load_pretrained(out).stages]


def test_training_writes_model_metrics_checkpoint_and_figures(data_dir, tmp_path):
    out = train(tiny_run(data_dir, tmp_path / "m", figures=True), PRESETS["tiny"], progress=False)
    model = load_pretrained(out)
    knots = model.config.noise_calibration
    assert knots[0] == (0.0, 1.0) and knots[-1][0] == pytest.approx(30.0) and len(knots) == 8
    provenance = model.config.provenance
    assert provenance["train_config"]["iterations"] == 4 and provenance["processes"] == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for key in ("pixel_mse", "rate", "delta_rate_f", "delta_rate_g", "zero_fraction", "holdout_psnr",
                "holdout_zero_fraction", "holdout_denoise25_psnr"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert (out / "checkpoint" / "state.json").is_file()
    for name in ("atoms_stage1.png", "atoms_stage2.png", "reconstructions.png", "curves.png"):
        with Image.open(out / "figures" / name) as image:
            assert image.size[0] > 10
    # Trained atoms stay on the unit sphere and the shipped step size is a converged one.
    for stage in model.stages:
        torch.testing.assert_close(stage.dictionary.flatten(1).norm(dim=1), torch.ones(stage.num_atoms))


def test_training_raises_held_out_psnr_and_learns_penalty_weights(data_dir, tmp_path):
    config = tiny_run(data_dir, tmp_path / "m", iterations=40, eval_every=2, checkpoint_every=40, rate_weight=0,
                      lr=3e-3)
    out = train(config, PRESETS["tiny"], progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["holdout_psnr"] > records[0]["holdout_psnr"] + 1.0  # dB, well past step-to-step jitter
    weights = [stage.lmbda_weights.detach() for stage in load_pretrained(out).stages]
    assert all((w >= 0).all() for w in weights)  # projected after every step
    assert any((w - 1).abs().max() > 0.05 for w in weights)  # the per-atom penalty weights were learned


def test_same_seed_same_model(data_dir, tmp_path):
    a = weights(train(tiny_run(data_dir, tmp_path / "a"), PRESETS["tiny"], progress=False))
    b = weights(train(tiny_run(data_dir, tmp_path / "b"), PRESETS["tiny"], progress=False))
    c = weights(train(tiny_run(data_dir, tmp_path / "c", seed=1), PRESETS["tiny"], progress=False))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_identical_to_an_uninterrupted_run(data_dir, tmp_path, monkeypatch, workers):
    whole = train(tiny_run(data_dir, tmp_path / "whole", iterations=6, workers=workers), PRESETS["tiny"],
                  progress=False)
    part = tmp_path / "part"
    real_step = Trainer.train_step

    def interrupted(self, step, batch=None):
        if step == 3:  # one step past the checkpoint of step 2: that step is lost and redone
            raise KeyboardInterrupt
        return real_step(self, step, batch)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(data_dir, part, iterations=6, workers=workers), PRESETS["tiny"], progress=False)
    assert not (part / "model.safetensors").exists()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    train(tiny_run(data_dir, part, iterations=6, workers=workers), resume=True, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(weights(whole), weights(part)))
    assert load_pretrained(part).config.noise_calibration == load_pretrained(whole).config.noise_calibration
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]


def test_resume_refuses_other_settings_and_missing_checkpoint(data_dir, tmp_path):
    out = tmp_path / "m"
    train(tiny_run(data_dir, out, iterations=2), PRESETS["tiny"], progress=False)
    with pytest.raises(ValueError, match="lr="):
        train(tiny_run(data_dir, out, iterations=4, lr=0.1), resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny_run(data_dir, tmp_path / "empty"), resume=True, progress=False)


def test_resume_falls_back_to_the_previous_checkpoint(data_dir, tmp_path):
    out = tmp_path / "m"
    train(tiny_run(data_dir, out, iterations=2), PRESETS["tiny"], progress=False)
    os.replace(out / "checkpoint", out / ".checkpoint.old")  # killed between the two renames of a swap
    train(tiny_run(data_dir, out, iterations=4), resume=True, progress=False)
    assert load_pretrained(out).config.provenance["train_config"]["iterations"] == 4


def test_bad_data_folder_leaves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        train(tiny_run(tmp_path / "missing", tmp_path / "out"), PRESETS["tiny"], progress=False)
    assert not (tmp_path / "out").exists()


def test_train_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(data="d", out="o", batch_size=0)
    with pytest.raises(ValueError, match="lr_final"):
        TrainConfig(data="d", out="o", lr_final=0)


def test_calibration_starts_at_one_and_is_learnable():
    calib = Calibration(50.0, 6)
    scale = calib(torch.linspace(0.0, 80.0, 33))  # every segment, and past the last knot
    assert scale[0] == 1 and torch.all(scale[1:] > scale[:-1])  # grows with sigma, extended past the end
    scale.sum().backward()
    assert calib.log_scale.grad is not None and torch.all(calib.log_scale.grad != 0)
    again = Calibration(50.0, 6, initial=calib.knots())
    torch.testing.assert_close(again.knot_scale(), calib.knot_scale())


def test_rate_terms_change_the_update(data_dir):
    from csc_serve.training.data import ImageFolderDataset, list_images

    def one_step(rate_weight):
        torch.manual_seed(0)
        from csc_serve.models import CSCAutoencoder

        model = CSCAutoencoder(PRESETS["tiny"]).train()
        config = tiny_run(data_dir, "unused", rate_weight=rate_weight)
        trainer = Trainer(model, config, ImageFolderDataset(list_images(data_dir), 3, crop_size=16), None)
        metrics = trainer.train_step(0)
        return [s.dictionary.detach().clone() for s in model.stages], metrics

    plain, m0 = one_step(0.0)
    game, m1 = one_step(1e-2)
    assert "delta_rate_f" not in m0 and m1["delta_rate_f"] > 0 and m1["rate"] > 0
    assert not all(torch.equal(a, b) for a, b in zip(plain, game))


def test_torchrun_two_processes_average_gradients(data_dir, tmp_path):
    """Two gloo processes on CPU: rank 0 draws the same batches as a single process, so a result that
    differs from the single-process run shows the other rank's gradients were averaged in."""
    args = ["--data", str(data_dir), "--preset", "tiny", "--crop-size", "16", "--batch-size", "4",
            "--iterations", "3", "--rate-batch", "2", "--eval-every", "3", "--checkpoint-every", "3",
            "--eval-images", "2", "--holdout-fraction", "0.3", "--sigma-max", "30", "--figures", "0",
            "--threads", "1", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "csc_serve.cli", "train", "--out", str(tmp_path / "ddp"), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "csc_serve.cli", "train", "--out", str(tmp_path / "one"), *args],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = load_pretrained(tmp_path / "ddp")
    assert ddp.config.provenance["processes"] == 2
    assert not all(torch.equal(a, b) for a, b in zip(weights(tmp_path / "ddp"), weights(tmp_path / "one")))
    assert dataclasses.asdict(ddp.config)["noise_calibration"] is not None


def test_recon_psnr_makes_scale_one_the_sparsest_reconstruction_meeting_it(data_dir, tmp_path):
    plain = train(tiny_run(data_dir, tmp_path / "plain", iterations=6, lr=3e-3), PRESETS["tiny"], progress=False)
    reached = json.loads((plain / "metrics.jsonl").read_text().splitlines()[-1])["holdout_psnr"]
    moved = train(tiny_run(data_dir, tmp_path / "moved", iterations=6, lr=3e-3, recon_psnr=reached - 2.0),
                  PRESETS["tiny"], progress=False)
    a, b = load_pretrained(plain), load_pretrained(moved)
    factor = b.config.provenance["reconstruction_scale_factor"]
    assert factor > 1.2
    for before, after, stage in zip(a.stages, b.stages, b.config.stages):  # the same training; only lmbda moved
        torch.testing.assert_close(after.dictionary, before.dictionary, rtol=0, atol=0)
        torch.testing.assert_close(after.lmbda_weights, before.lmbda_weights, rtol=0, atol=0)
        assert after.lmbda == stage.lmbda == pytest.approx(before.lmbda * factor)
    record = json.loads((moved / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["holdout_psnr"] == pytest.approx(reached)  # metrics are logged before the move
    images = [torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    sparse = evaluate_images(b, images, "reconstruct").zero_fraction
    assert sparse > evaluate_images(a, images, "reconstruct").zero_fraction


def test_moving_the_reconstruction_setting_keeps_every_denoising_threshold():
    torch.manual_seed(0)
    model = CSCAutoencoder(dataclasses.replace(PRESETS["tiny"], noise_calibration=((0, 1), (20, 3), (50, 6))))
    model.eval()
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    # From the first knot on; below it the map runs from the new reconstruction setting, s(0) = 1.
    before = {sigma: model.denoise(x, sigma) for sigma in (20.0, 35.0, 50.0, 60.0)}
    at_three = model.reconstruct(x, 3.0)
    knots = move_reconstruction_setting(model, 3.0)
    assert knots == ((0, 1), (20, 1.0), (50, 2.0))
    model.config = dataclasses.replace(model.config, noise_calibration=knots)
    for sigma, out in before.items():
        torch.testing.assert_close(model.denoise(x, sigma), out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.reconstruct(x, 1.0), at_three, rtol=1e-5, atol=1e-6)


def test_sparsest_reconstruction_scale_is_the_largest_meeting_the_target():
    # A tight frame of 3x3 colour atoms: exact at a small threshold, worse as the threshold grows.
    model = CSCAutoencoder(CSCConfig(in_channels=3, stages=(StageConfig(27, 3, lmbda=0.01, num_steps=5),)))
    init_dictionaries(model)
    model.eval()
    images = [torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def quality(scale: float) -> float:
        return evaluate_images(model, images, "reconstruct", lmbda_scale=scale).psnr

    target = quality(1.0) - 3.0
    scale = sparsest_reconstruction_scale(model, images, target)
    assert scale > 1.5 and quality(scale) >= target > quality(scale * 1.05)
    assert sparsest_reconstruction_scale(model, images, quality(1.0) + 1.0) == 1.0
    # Thresholds a hundredth as large: the target is met only far above scale 1, and the search gets there.
    for stage in model.stages:
        stage.lmbda_weights.data.mul_(0.01)
    scale = sparsest_reconstruction_scale(model, images, target)
    assert scale > 150 and quality(scale) >= target > quality(scale * 1.05)


def test_the_default_preset_is_the_architecture_of_the_bundled_model():
    """`csc train` without --preset builds the network that ships (its trained lmbda and noise map aside)."""
    from csc_serve.cli.main import build_parser

    bundled, preset = load_pretrained("csc-ctrl-rgb").config, PRESETS["csc-ctrl-rgb"]
    assert [dataclasses.replace(s, lmbda=0.0) for s in bundled.stages] == \
        [dataclasses.replace(s, lmbda=0.0) for s in preset.stages]
    ignored = {"stages": preset.stages, "noise_calibration": None, "provenance": {}}
    assert dataclasses.replace(bundled, **ignored) == dataclasses.replace(preset, **ignored)
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o"])
    assert args.preset == "csc-ctrl-rgb"
