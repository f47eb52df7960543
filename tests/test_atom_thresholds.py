"""Per-atom and noise-affine thresholds: the docstring's equations in every FISTA form, the noise level as a
per-sample input, exact conversion from shared thresholds, more steps, save/load and training."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from csc_serve.models import ConfigError, CSCAutoencoder, CSCLayer, StageConfig, fista_form
from csc_serve.models.grow import deepen

from .conftest import tiny_config
from .test_learned_steps import _learned_model

# Float32 forms of the same iteration differ by rounding only; a few steps keep it near 1e-6.
TOL = 1e-4


def _layer(thresholds: str, kernel_size=5, stride=1, nonnegative=False, num_steps=5, seed=0) -> CSCLayer:
    torch.manual_seed(seed)
    layer = CSCLayer(3, 7, kernel_size, stride=stride, lmbda=0.05, num_steps=num_steps, nonnegative=nonnegative,
                     learned_steps=True, thresholds=thresholds)
    with torch.no_grad():
        layer.step_scales.copy_(torch.rand(num_steps) * 1.5 + 0.3)
        layer.threshold_scales.copy_(torch.rand(num_steps, 7) * 1.5 + 0.3)
        layer.lmbda_weights.copy_(torch.rand(7) + 0.5)
        if thresholds == "noise_affine":
            # Both signs: some thresholds grow with the noise, some shrink to zero (the relu acts).
            layer.threshold_slopes.copy_(torch.randn(num_steps, 7) * 8.0)
    return layer.eval()


@torch.no_grad()
def _reference(layer: CSCLayer, x: torch.Tensor, scale: torch.Tensor, noise: torch.Tensor,
               per_position=None) -> torch.Tensor:
    """The docstring's equations written out, sample by sample: threshold of atom j at step k is
    eta_k lmbda w_j s_b relu(tau_kj + rho_kj sigma_b); ``per_position(v, thresh, k)``, where given, turns it into
    the thresholds of every position from the gradient step ``v``."""
    eta0 = float(layer.step_size)
    alpha, tau = layer.step_scales.detach(), layer.threshold_scales.detach()
    rho = layer.threshold_slopes.detach() if layer.noise_adaptive else torch.zeros_like(tau)
    w = layer.lmbda_weights.detach()
    out = []
    for b in range(x.shape[0]):
        xb = x[b : b + 1]
        t, y = 1.0, torch.zeros_like(layer.analysis(xb))
        z = torch.zeros_like(y)
        for k in range(layer.num_steps):
            eta = eta0 * float(alpha[k])
            grad = layer.analysis(layer.decode(y)) - layer.analysis(xb)
            v = y - eta * grad
            factor = F.relu(tau[k] + rho[k] * float(noise[b]))
            thresh = (eta * layer.lmbda * w * float(scale[b]) * factor).view(1, -1, 1, 1)
            if per_position is not None:
                thresh = per_position(v, thresh, k)
            z_prev = z
            z = F.relu(v - thresh) if layer.nonnegative else torch.sign(v) * F.relu(v.abs() - thresh)
            t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
            y = z + (t - 1.0) / t_next * (z - z_prev)
            t = t_next
        out.append(z)
    return torch.cat(out)


@pytest.mark.parametrize("thresholds", ["per_atom", "noise_affine"])
@pytest.mark.parametrize("nonnegative", [True, False])
@pytest.mark.parametrize("kernel_size,stride", [(5, 1), (3, 2), (1, 1)])
@pytest.mark.parametrize("form", ["training", "folded", "inference"])
def test_every_form_follows_the_threshold_equations(form, kernel_size, stride, nonnegative, thresholds):
    layer = _layer(thresholds, kernel_size, stride, nonnegative)
    x = torch.randn(3, 3, 12, 16, generator=torch.Generator().manual_seed(1))
    scale, noise = torch.tensor([0.5, 2.0, 1.0]), torch.tensor([0.0, 0.1, 0.2])
    with torch.no_grad(), fista_form(form):
        codes = layer.encode(x, scale, noise=noise)
    expected = _reference(layer, x, scale, noise)
    assert (codes - expected).abs().max() <= TOL * max(1.0, float(expected.abs().max()))
    assert (codes == 0).any()  # the thresholds act


def test_the_noise_level_moves_only_noise_affine_thresholds():
    x = torch.randn(2, 3, 12, 16, generator=torch.Generator().manual_seed(2))
    affine, per_atom = _layer("noise_affine"), _layer("per_atom")
    with torch.no_grad():
        assert (affine.encode(x, 1.0, noise=0.15) - affine.encode(x, 1.0)).abs().max() > 1e-3
        torch.testing.assert_close(affine.encode(x, 1.0), affine.encode(x, 1.0, noise=0.0))
        torch.testing.assert_close(per_atom.encode(x, 1.0, noise=0.15), per_atom.encode(x, 1.0))
    with pytest.raises(ValueError, match="noise must be a scalar or have shape"):
        affine.encode(x, 1.0, noise=torch.zeros(3))


def _model(thresholds: str = "shared") -> CSCAutoencoder:
    """The learned-steps test model, with ``thresholds`` given to both stages (the same outputs)."""
    model = _learned_model()
    return model if thresholds == "shared" else deepen(deepen(model, 0, thresholds=thresholds), 1,
                                                       thresholds=thresholds)


@pytest.mark.parametrize("thresholds", ["per_atom", "noise_affine"])
@pytest.mark.parametrize("form", ["training", "folded", "inference"])
def test_finer_thresholds_start_from_what_the_model_computes(form, thresholds):
    shared, finer = _model(), _model(thresholds)
    assert [s.thresholds for s in finer.config.stages] == [thresholds, thresholds]
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    scale, sigma = torch.tensor([0.8, 2.0]), torch.tensor([10.0, 40.0])
    with torch.no_grad(), fista_form(form):
        torch.testing.assert_close(finer.encode(images, scale, sigma=sigma), shared.encode(images, scale),
                                   rtol=0, atol=2e-6)
        torch.testing.assert_close(finer.reconstruct(images, scale, sigma=sigma), shared.reconstruct(images, scale),
                                   rtol=0, atol=2e-6)


def test_denoise_passes_its_noise_level_to_the_thresholds():
    model = _model("noise_affine")
    model.config = type(model.config)(**{**model.config.__dict__, "noise_calibration": ((0.0, 1.0), (50.0, 3.0))})
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model.denoise(images, 25.0)
        model.stages[0].threshold_slopes.fill_(-50.0)  # at sigma 25 (0.098 in value units): thresholds reach 0
        after = model.denoise(images, 25.0)
        scale = model.lmbda_scale_for_sigma(25.0).expand(2)
        torch.testing.assert_close(after, model.reconstruct(images, scale, sigma=torch.full((2,), 25.0)))
        # Reconstruction reads no noise level: the slopes leave it alone.
        torch.testing.assert_close(model.reconstruct(images, 1.0), _model("noise_affine").reconstruct(images, 1.0))
    assert (after - before).abs().max() > 1e-3
    with pytest.raises(ValueError, match="sigma must be a scalar or have shape"):
        model.reconstruct(images, 1.0, sigma=torch.zeros(3))


def _sloped_model() -> CSCAutoencoder:
    """A noise-affine model whose first stage has a different slope for every step and atom."""
    model = _model("noise_affine")
    with torch.no_grad():
        model.stages[0].threshold_slopes.copy_(torch.randn(4, 6))
    return model


def test_more_steps_repeat_the_last_steps_scalars_and_plain_fista_learns_them():
    model = _sloped_model()
    deeper = deepen(model, 0, num_steps=7)
    stage, old = deeper.stages[0], model.stages[0]
    assert deeper.config.stages[0].num_steps == 7 and stage.num_steps == 7 and len(stage.momentum) == 7
    for name in ("step_scales", "threshold_scales", "threshold_slopes"):
        new, before = getattr(stage, name).detach(), getattr(old, name).detach()
        torch.testing.assert_close(new[:4], before)
        torch.testing.assert_close(new[4:], before[-1:].expand_as(new[4:]))
    torch.testing.assert_close(stage.dictionary, old.dictionary)
    plain = CSCAutoencoder(tiny_config())
    learned = deepen(plain, 1, num_steps=5)
    assert learned.config.stages[1].learned_steps and float(learned.stages[1].step_scales.detach().min()) == 1.0
    with pytest.raises(ValueError, match="num_steps must be a positive integer, got 0"):
        deepen(model, 0, num_steps=0)
    with pytest.raises(ValueError, match="thresholds must be one of noise_affine"):
        deepen(model, 0, thresholds="per_atom")
    with pytest.raises(ValueError, match="stage must be between 1 and 2"):
        deepen(model, 2, num_steps=9)


def test_fewer_steps_keep_the_last_steps_scalars_and_undo_more_steps():
    model = _sloped_model()
    fewer = deepen(model, 0, num_steps=2)
    stage, old = fewer.stages[0], model.stages[0]
    assert fewer.config.stages[0].num_steps == 2 and len(stage.momentum) == 2
    for name in ("step_scales", "threshold_scales", "threshold_slopes"):
        torch.testing.assert_close(getattr(stage, name).detach(), getattr(old, name).detach()[[0, 3]])
    images = torch.rand(2, 3, 16, 20, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([10.0, 30.0])
    with torch.no_grad():
        before = model.reconstruct(images, 1.0, sigma=sigma)
        assert (fewer.reconstruct(images, 1.0, sigma=sigma) - before).abs().max() > 1e-4
        back = deepen(deepen(model, 0, num_steps=9), 0, num_steps=4)  # steps added, then removed
        torch.testing.assert_close(back.reconstruct(images, 1.0, sigma=sigma), before)
        torch.testing.assert_close(back.encode(images, 2.0, sigma=sigma), model.encode(images, 2.0, sigma=sigma))
        single = deepen(model, 0, num_steps=1)  # one step: the last step's scalars alone
        torch.testing.assert_close(single.stages[0].step_scales.detach(), old.step_scales.detach()[-1:])


def test_config_refuses_finer_thresholds_without_learned_steps_and_writes_them_only_where_set(tmp_path):
    with pytest.raises(ConfigError, match="needs learned_steps"):
        StageConfig(num_atoms=4, kernel_size=3, thresholds="per_atom")
    with pytest.raises(ConfigError, match="thresholds must be one of"):
        StageConfig(num_atoms=4, kernel_size=3, learned_steps=True, thresholds="per_pixel")
    model = _model("noise_affine")
    with torch.no_grad():
        model.stages[1].threshold_slopes.copy_(torch.randn(3, 8))
    model.save_pretrained(tmp_path / "m")
    stages = json.loads((tmp_path / "m" / "config.json").read_text())["architecture"]["stages"]
    assert [s["thresholds"] for s in stages] == ["noise_affine", "noise_affine"]
    again = CSCAutoencoder.from_pretrained(tmp_path / "m")
    assert again.config.noise_adaptive
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(again.reconstruct(images, 1.3, sigma=torch.tensor([5.0, 30.0])),
                                   model.reconstruct(images, 1.3, sigma=torch.tensor([5.0, 30.0])))
    _model().save_pretrained(tmp_path / "s")
    assert "thresholds" not in (tmp_path / "s" / "config.json").read_text()


def test_slopes_learn_from_noisy_samples_and_keep_their_sign():
    layer = _layer("noise_affine")
    x = torch.randn(2, 3, 12, 16, generator=torch.Generator().manual_seed(6))
    loss = (layer.decode(layer.encode(x, 1.0, form="training", noise=torch.tensor([0.0, 0.1]))) - x).pow(2).mean()
    loss.backward()
    assert layer.threshold_slopes.grad.abs().sum() > 0 and layer.threshold_scales.grad.abs().sum() > 0
    assert any(p is layer.threshold_slopes for p in layer.threshold_parameters())
    with torch.no_grad():
        layer.threshold_slopes.fill_(-3.0)
        layer.threshold_scales[0, 0] = -1.0
    layer.clamp_lmbda_weights()
    assert float(layer.threshold_slopes.max()) == -3.0 and float(layer.threshold_scales.min()) == 0.0
    clean = _layer("noise_affine")
    x = torch.randn(2, 3, 12, 16, generator=torch.Generator().manual_seed(7))
    (layer_grad,) = torch.autograd.grad(clean.encode(x, 1.0, form="training").sum(), clean.threshold_slopes,
                                        allow_unused=True, materialize_grads=True)
    assert float(layer_grad.abs().sum()) == 0.0  # no noise, no gradient for the slopes
