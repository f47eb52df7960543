"""Learned per-step step sizes and thresholds: the equations of the docstring, every FISTA form, save/load,
ONNX export and training."""

import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from csc_serve.export import export_onnx
from csc_serve.models import CSCAutoencoder, CSCLayer, StageConfig, fista_form
from csc_serve.models.serialization import weights_sha256

from .conftest import tiny_config

# Float32 forms of the same iteration differ by rounding only; a few steps keep it near 1e-6.
TOL = 1e-4


def _layer(kernel_size=5, stride=1, mu=0.0, nonnegative=False, seed=0, num_steps=6) -> CSCLayer:
    torch.manual_seed(seed)
    layer = CSCLayer(3, 7, kernel_size, stride=stride, lmbda=0.05, num_steps=num_steps, nonnegative=nonnegative,
                     mu=mu, learned_steps=True)
    with torch.no_grad():
        layer.step_scales.copy_(torch.rand(num_steps) * 1.5 + 0.3)
        layer.threshold_scales.copy_(torch.rand(num_steps) * 1.5 + 0.3)
        layer.lmbda_weights.copy_(torch.rand(7) + 0.5)
    return layer.eval()


def _reference(layer: CSCLayer, x: torch.Tensor, scale: float) -> torch.Tensor:
    """The docstring's equations, written out: eta_k = alpha_k / (L + mu), threshold eta_k tau_k lmbda w s."""
    eta0 = float(layer.step_size)
    alpha, tau = layer.step_scales.detach(), layer.threshold_scales.detach()
    w = layer.lmbda_weights.detach().view(1, -1, 1, 1)

    def prox(v, t):
        return F.relu(v - t) if layer.nonnegative else torch.sign(v) * F.relu(v.abs() - t)

    # Beck and Teboulle's schedule, written out: t_1 = 1, t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2,
    # y_1 = z_0 = 0, y_{k+1} = z_k + (t_k - 1) / t_{k+1} (z_k - z_{k-1}).
    t = 1.0
    y = torch.zeros_like(layer.analysis(x))
    z = torch.zeros_like(y)
    for k in range(layer.num_steps):
        eta = eta0 * float(alpha[k])
        grad = layer.analysis(layer.decode(y)) - layer.analysis(x) + layer.mu * y
        z_prev, z = z, prox(y - eta * grad, eta * float(tau[k]) * layer.lmbda * w * scale)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        y = z + (t - 1.0) / t_next * (z - z_prev)
        t = t_next
    return z


@pytest.mark.parametrize("nonnegative", [True, False])
@pytest.mark.parametrize("kernel_size,stride,mu", [(5, 1, 0.0), (3, 2, 0.2), (1, 1, 0.0), (1, 1, 0.3)])
@pytest.mark.parametrize("form", ["training", "folded", "inference"])
def test_every_form_follows_the_learned_step_equations(form, kernel_size, stride, mu, nonnegative):
    layer = _layer(kernel_size, stride, mu, nonnegative)
    x = torch.randn(2, 3, 12, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), fista_form(form):
        for scale in (0.5, 2.0):
            codes = layer.encode(x, torch.full((2,), scale))
            expected = _reference(layer, x, scale)
            assert (codes - expected).abs().max() <= TOL * max(1.0, float(expected.abs().max()))
            assert (codes == 0).any()  # the thresholds act


def test_unit_scales_are_plain_fista():
    learned = _layer()
    with torch.no_grad():
        learned.step_scales.fill_(1.0)
        learned.threshold_scales.fill_(1.0)
    learned.ensure_step_size()  # the state copied below holds the step size of this dictionary
    plain = CSCLayer(3, 7, 5, lmbda=0.05, num_steps=6, nonnegative=False)
    plain.load_state_dict({k: v for k, v in learned.state_dict().items() if "scales" not in k})
    x = torch.randn(2, 3, 12, 16, generator=torch.Generator().manual_seed(2))
    for form in ("training", "folded", "inference"):
        with torch.no_grad(), fista_form(form):
            torch.testing.assert_close(learned.encode(x, 1.5), plain.encode(x, 1.5), rtol=0, atol=1e-6)


def test_other_step_scales_change_the_codes():
    layer = _layer()
    x = torch.randn(1, 3, 12, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = layer.encode(x)
        layer.step_scales.mul_(0.5)
        assert (layer.encode(x) - before).abs().max() > 1e-3


def test_scales_learn_and_stay_non_negative():
    layer = _layer()
    x = torch.randn(2, 3, 12, 16, generator=torch.Generator().manual_seed(4))
    loss = (layer.decode(layer.encode(x, form="training")) - x).pow(2).mean()
    loss.backward()
    assert layer.step_scales.grad.abs().sum() > 0 and layer.threshold_scales.grad.abs().sum() > 0
    assert set(map(id, layer.threshold_parameters())) == {
        id(layer.lmbda_weights), id(layer.step_scales), id(layer.threshold_scales)}
    with torch.no_grad():
        layer.step_scales[0] = -1.0
    layer.clamp_lmbda_weights()
    assert float(layer.step_scales.min()) == 0.0
    detached = layer.fista(x, layer.dictionary, layer.threshold(x, 1.0), form="training", detach_steps=True)
    assert not torch.autograd.grad(detached.sum(), layer.dictionary, retain_graph=True)[0].eq(0).all()
    layer.step_scales.grad = None
    detached.sum().backward()
    assert layer.step_scales.grad is None


def _learned_model() -> CSCAutoencoder:
    torch.manual_seed(0)
    config = tiny_config(stages=(
        StageConfig(num_atoms=6, kernel_size=5, stride=2, lmbda=0.05, num_steps=4, learned_steps=True),
        StageConfig(num_atoms=8, kernel_size=1, stride=1, lmbda=0.05, num_steps=3, learned_steps=True),
    ), nonnegative=False, shift_average=True)
    model = CSCAutoencoder(config).eval()
    with torch.no_grad():
        for stage in model.stages:
            stage.step_scales.copy_(torch.rand(stage.num_steps) + 0.5)
            stage.threshold_scales.copy_(torch.rand(stage.num_steps) + 0.5)
    return model


def test_save_and_load_keep_the_scales_and_plain_configs_read_as_before(tmp_path):
    model = _learned_model()
    model.save_pretrained(tmp_path / "m")
    stages = json.loads((tmp_path / "m" / "config.json").read_text())["architecture"]["stages"]
    assert [s["learned_steps"] for s in stages] == [True, True]
    again = CSCAutoencoder.from_pretrained(tmp_path / "m")
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(again.reconstruct(images, 1.3), model.reconstruct(images, 1.3))
    plain = CSCAutoencoder(tiny_config())
    plain.save_pretrained(tmp_path / "p")
    text = (tmp_path / "p" / "config.json").read_text()
    assert "learned_steps" not in text


def test_onnx_graphs_of_learned_steps_match_torch_for_two_scales(tmp_path):
    model = _learned_model()
    manifest = export_onnx(model, tmp_path, weights_sha256=weights_sha256(model))
    path = tmp_path / manifest["onnx"]["graphs"]["reconstruct"]["file"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.rand(2, 3, 16, 12, generator=torch.Generator().manual_seed(6))
    scale = torch.tensor([0.7, 2.5])
    with torch.no_grad():
        expected = model.reconstruct(images, scale).numpy()
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, dict(zip(names, [images.numpy(), scale.numpy()])))[0]
    np.testing.assert_allclose(got, expected, atol=TOL)
