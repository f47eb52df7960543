"""One PSNR for training, evaluation, serving and benchmarks (csc_serve.models.metrics)."""

import math

import numpy as np
import pytest
import torch

import csc_serve
from csc_serve.models import psnr


def _pair(seed=0, shape=(3, 2, 8, 8)):
    rng = np.random.default_rng(seed)
    target = rng.random(shape)
    estimate = target + rng.normal(0, 0.1, shape)  # leaves [0, 1] in places
    return estimate, target


def test_psnr_is_ten_log10_of_peak_squared_over_mse():
    target = np.zeros((2, 4, 4))
    assert psnr(target + 0.1, target) == pytest.approx(20.0)  # mse 1e-2
    assert psnr(target + 25.5, target, data_range=255) == pytest.approx(20.0)
    assert psnr(target, target) == pytest.approx(120.0)  # the MSE floor: finite, so JSON can hold it
    assert isinstance(psnr(target + 0.1, target), float)


def test_numpy_and_torch_give_the_same_values_whole_and_per_image():
    estimate, target = _pair()
    whole, per_image = psnr(estimate, target), psnr(estimate, target, per_image=True)
    assert per_image.shape == (3,) and not np.allclose(per_image.mean(), whole)  # two different reductions
    t_est, t_tgt = torch.from_numpy(estimate), torch.from_numpy(target)
    assert float(psnr(t_est, t_tgt)) == pytest.approx(whole, rel=1e-12)  # both float64
    np.testing.assert_allclose(psnr(t_est, t_tgt, per_image=True).numpy(), per_image, rtol=1e-12)
    for i in range(3):
        assert psnr(estimate[i], target[i]) == pytest.approx(per_image[i], rel=1e-12)


def test_nothing_is_clipped_unless_asked():
    estimate, target = _pair(1)
    assert estimate.min() < 0 and estimate.max() > 1
    plain, clipped = psnr(estimate, target), psnr(estimate, target, clip=True)
    assert clipped > plain  # clipping the estimate to the target's range only removes error
    error = np.clip(estimate, 0, 1) - target
    assert clipped == pytest.approx(-10 * math.log10(np.mean(error**2)), rel=1e-12)
    torch_clipped = psnr(torch.from_numpy(estimate), torch.from_numpy(target), clip=True)
    assert float(torch_clipped) == pytest.approx(clipped, rel=1e-12)


def test_every_caller_uses_the_one_function():
    from csc_serve.bench import backends
    from csc_serve.service import engine
    from csc_serve.training import evaluate

    assert csc_serve.psnr is psnr and evaluate.psnr is psnr and backends.psnr is psnr and engine.psnr is psnr
