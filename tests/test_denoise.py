"""The sigma -> lmbda_scale calibration stored in config.json, and CSCAutoencoder.denoise with it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from csc_serve.models import ConfigError, CSCAutoencoder, CSCConfig, add_gaussian_noise
from csc_serve.models.calibration import interpolate_scale
from tests.conftest import tiny_config

KNOTS = ((0.0, 1.0), (20.0, 3.0), (40.0, 4.0))


def test_interpolation_through_the_knots_and_linear_past_the_last():
    ks, kv = torch.tensor(KNOTS, dtype=torch.float64).unbind(1)
    sigma = torch.tensor([0.0, 10.0, 20.0, 30.0, 40.0, 60.0], dtype=torch.float64)
    expected = torch.tensor([1.0, 2.0, 3.0, 3.5, 4.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(interpolate_scale(sigma, ks, kv), expected)
    assert interpolate_scale(torch.tensor([-5.0], dtype=torch.float64), ks, kv)[0] == 1.0  # negative: clamped to 0


def test_calibration_round_trips_through_config_json(tmp_path):
    model = CSCAutoencoder(tiny_config(noise_calibration=KNOTS))
    model.save_pretrained(tmp_path / "m")
    loaded = CSCAutoencoder.from_pretrained(tmp_path / "m")
    assert loaded.config.noise_calibration == KNOTS
    assert CSCConfig.from_dict(model.config.to_dict()).noise_calibration == KNOTS


@pytest.mark.parametrize(
    "knots,message",
    [
        (((1.0, 1.0), (20.0, 2.0)), "from 0"),
        (((0.0, 1.0),), "two or more"),
        (((0.0, 1.0), (20.0, 2.0), (10.0, 3.0)), "strictly increasing"),
        (((0.0, 1.0), (20.0, -2.0)), "positive"),
        (((0.0, 1.0), (20.0, float("nan"))), "finite"),
        ((("a", 1.0), (20.0, 2.0)), "pairs"),
    ],
)
def test_invalid_calibrations_are_refused(knots, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(noise_calibration=knots)


def test_scale_for_sigma_per_sample():
    model = CSCAutoencoder(tiny_config(noise_calibration=KNOTS))
    torch.testing.assert_close(model.lmbda_scale_for_sigma([0.0, 10.0, 40.0]), torch.tensor([1.0, 2.0, 4.0]))
    with pytest.raises(ValueError, match="no noise calibration"):
        CSCAutoencoder(tiny_config()).lmbda_scale_for_sigma(10.0)


@pytest.fixture
def smooth_images() -> torch.Tensor:
    """Two 64x64 RGB images of smooth ramps and a step edge: big enough for the noise estimator."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    a = torch.stack([0.2 + 0.6 * xx, 0.3 + 0.4 * yy, 0.5 + 0.3 * (xx > 0.5).float()])
    b = torch.stack([0.7 - 0.5 * yy, 0.4 + 0.2 * xx, 0.3 + 0.4 * (yy > 0.3).float()])
    return torch.stack([a, b])


def test_denoise_uses_the_calibrated_scale(smooth_images):
    torch.manual_seed(0)
    model = CSCAutoencoder(tiny_config(noise_calibration=KNOTS)).eval()
    noisy = add_gaussian_noise(smooth_images, 20.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        given = model.denoise(noisy, 20.0)
        torch.testing.assert_close(given, model.reconstruct(noisy, torch.full((2,), 3.0)))
        per_image = model.denoise(noisy, torch.tensor([0.0, 40.0]))
        torch.testing.assert_close(per_image, model.reconstruct(noisy, torch.tensor([1.0, 4.0])))


def test_blind_denoise_estimates_the_level_per_image(smooth_images):
    torch.manual_seed(0)
    model = CSCAutoencoder(tiny_config(noise_calibration=KNOTS)).eval()
    sigmas = torch.tensor([10.0, 40.0])
    noisy = add_gaussian_noise(smooth_images, sigmas, torch.Generator().manual_seed(1))
    from csc_serve.models import estimate_noise_sigma

    estimated = estimate_noise_sigma(noisy)
    assert torch.allclose(estimated, sigmas.double(), rtol=0.1)  # the estimator's documented accuracy
    with torch.no_grad():
        expected = model.reconstruct(noisy, model.lmbda_scale_for_sigma(estimated))
        torch.testing.assert_close(model.denoise(noisy), expected)


def test_larger_sigma_gives_sparser_codes(smooth_images):
    torch.manual_seed(0)
    model = CSCAutoencoder(dataclasses.replace(tiny_config(), noise_calibration=KNOTS)).eval()
    with torch.no_grad():
        scales = [model.lmbda_scale_for_sigma([s, s]) for s in (0, 20, 40)]
        zeros = [(model.encode(smooth_images, scale) == 0).float().mean() for scale in scales]
    assert zeros[0] < zeros[1] < zeros[2]


def test_refined_calibration_is_never_worse_on_its_images(smooth_images):
    from csc_serve.training.calibration import refine_calibration
    from csc_serve.training.evaluate import evaluate_images

    torch.manual_seed(0)
    model = CSCAutoencoder(tiny_config(noise_calibration=KNOTS)).eval()
    images = list(smooth_images)
    refined = refine_calibration(model, images, seed=3, steps=5)
    assert refined[0] == (0.0, 1.0) and [k[0] for k in refined] == [k[0] for k in KNOTS]
    tuned = CSCAutoencoder(tiny_config(noise_calibration=refined))
    tuned.load_state_dict(model.state_dict())
    for sigma, scale in KNOTS[1:]:
        assert 0.5 * scale <= dict(refined)[sigma] <= 2 * scale  # the searched range
        before = evaluate_images(model.eval(), images, "denoise", sigma=sigma, seed=3).psnr
        after = evaluate_images(tuned.eval(), images, "denoise", sigma=sigma, seed=3).psnr
        assert after >= before - 1e-6


def test_evaluation_noise_is_float_unclipped_and_tied_to_seed_and_index():
    from csc_serve.training.evaluate import noisy_copy

    clean = torch.full((3, 64, 64), 0.5)
    noisy = noisy_copy(clean, 25.0, seed=0, index=0)
    noise = noisy - clean
    assert abs(float(noise.std()) - 25 / 255) < 0.05 * 25 / 255  # 12k samples: well within 5%
    assert len(torch.unique(noisy)) > 10_000  # not rounded to 8 bits
    assert noisy_copy(torch.zeros(3, 8, 8), 25.0, 0, 0).min() < 0  # not clipped
    assert torch.equal(noisy, noisy_copy(clean, 25.0, seed=0, index=0))
    assert not torch.equal(noisy, noisy_copy(clean, 25.0, seed=0, index=1))
    assert not torch.equal(noisy, noisy_copy(clean, 25.0, seed=1, index=0))
