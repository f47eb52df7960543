"""Thresholds set per code position by the energy of its neighbourhood (``StageConfig.neighbourhood``): the
equations of ``csc_serve.models.fista`` in every FISTA form, what the exponents do, the exact start from a model
without them, growing, save/load, ONNX parity and ``csc grow --neighbourhood``."""

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from csc_serve.cli.main import main
from csc_serve.export import export_onnx
from csc_serve.export.trt_ops import check_tensorrt_compatible
from csc_serve.models import ConfigError, CSCAutoencoder, CSCLayer, StageConfig, fista_form
from csc_serve.models.fista import local_thresholds
from csc_serve.models.grow import deepen, widen
from csc_serve.models.serialization import weights_sha256

from .test_atom_thresholds import _model
from .test_atom_thresholds import _reference as atom_reference

TOL = 1e-4


def _explicit_thresholds(v: torch.Tensor, t: torch.Tensor, gamma: torch.Tensor, n: int) -> torch.Tensor:
    """The docstring's t_kjp written out position by position: the mean of v^2 over the n x n positions
    around p that lie inside the map."""
    out = torch.empty_like(v)
    r = n // 2
    height, width = v.shape[2:]
    for b in range(v.shape[0]):
        for j in range(v.shape[1]):
            tj = float(t[min(b, t.shape[0] - 1), j])
            for y in range(height):
                for x in range(width):
                    block = v[b, j, max(0, y - r): y + r + 1, max(0, x - r): x + r + 1]
                    s = math.sqrt(float(block.pow(2).mean()) + 1e-12)
                    ratio = min(3.0, max(-3.0, math.log((tj + 1e-8) / (s + 1e-8))))
                    out[b, j, y, x] = tj * math.exp(float(gamma[j]) * ratio)
    return out


@pytest.mark.parametrize("window", [1, 3, 5])
def test_local_thresholds_follow_the_equation(window):
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(2, 3, 6, 7, generator=gen) * torch.tensor([0.01, 1.0, 100.0]).view(1, -1, 1, 1)
    t = torch.rand(2, 3, 1, 1, generator=gen) + 0.1
    gamma = torch.tensor([-0.7, 0.4, 1.5])
    got = local_thresholds(v, t, gamma, window)
    torch.testing.assert_close(got, _explicit_thresholds(v, t, gamma, window), rtol=1e-5, atol=1e-7)
    # The clip bounds the factor: a map 100 times the threshold moves it by exp(1.5 * 3) at most.
    assert float((got[:, 2] / t[:, 2]).min()) >= math.exp(-1.5 * 3.0) * (1 - 1e-5)


def test_positive_exponents_keep_spread_codes_and_remove_isolated_ones():
    v = torch.zeros(1, 1, 9, 9)
    v[0, 0, 1, 1] = 1.5  # isolated
    v[0, 0, 5:8, 5:8] = 1.5  # a structure over 3x3 positions
    t = torch.ones(1, 1, 1, 1)
    plain = F.relu(v - t) - F.relu(-v - t)
    thresholds = local_thresholds(v, t, torch.tensor([1.0]), 3)
    weighted = F.relu(v - thresholds) - F.relu(-v - thresholds)
    assert float(plain[0, 0, 1, 1]) == pytest.approx(0.5) and float(plain[0, 0, 6, 6]) == pytest.approx(0.5)
    assert float(weighted[0, 0, 1, 1]) == 0.0  # energy 1.5^2 / 9: threshold 1 * (1 / 0.5) = 2 > 1.5
    assert float(weighted[0, 0, 6, 6]) == pytest.approx(1.5 - 1 / 1.5)  # threshold 1 / 1.5
    torch.testing.assert_close(local_thresholds(v, t, torch.tensor([0.0]), 3), t.expand_as(v))


def _layer(thresholds: str, kernel_size=5, stride=1, nonnegative=False, num_steps=4, window=3) -> CSCLayer:
    torch.manual_seed(0)
    layer = CSCLayer(3, 7, kernel_size, stride=stride, lmbda=0.05, num_steps=num_steps, nonnegative=nonnegative,
                     learned_steps=True, thresholds=thresholds, neighbourhood=window)
    with torch.no_grad():
        layer.step_scales.copy_(torch.rand(num_steps) * 1.5 + 0.3)
        layer.threshold_scales.copy_(torch.rand(num_steps, 7) * 1.5 + 0.3)
        layer.lmbda_weights.copy_(torch.rand(7) + 0.5)
        layer.threshold_exponents.copy_(torch.randn(num_steps, 7))
        if thresholds == "noise_affine":
            layer.threshold_slopes.copy_(torch.randn(num_steps, 7) * 8.0)
    return layer.eval()


def _reference(layer: CSCLayer, x: torch.Tensor, scale: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """FISTA with the docstring's per-position thresholds, sample by sample."""
    gamma = layer.threshold_exponents.detach()
    return atom_reference(layer, x, scale, noise, lambda v, thresh, k: _explicit_thresholds(
        v, thresh.view(1, -1), gamma[k], layer.neighbourhood))


@pytest.mark.parametrize("thresholds", ["per_atom", "noise_affine"])
@pytest.mark.parametrize("nonnegative", [True, False])
@pytest.mark.parametrize("kernel_size,stride", [(3, 2), (1, 1)])
@pytest.mark.parametrize("form", ["training", "folded", "inference"])
def test_every_form_follows_the_reweighted_equations(form, kernel_size, stride, nonnegative, thresholds):
    layer = _layer(thresholds, kernel_size, stride, nonnegative)
    x = torch.randn(2, 3, 8, 10, generator=torch.Generator().manual_seed(1))
    scale, noise = torch.tensor([0.5, 2.0]), torch.tensor([0.05, 0.2])
    with torch.no_grad(), fista_form(form):
        codes = layer.encode(x, scale, noise=noise)
    expected = _reference(layer, x, scale, noise)
    assert (codes - expected).abs().max() <= TOL * max(1.0, float(expected.abs().max()))
    assert (codes == 0).any() and (codes != 0).any()
    with torch.no_grad():
        layer.threshold_exponents.zero_()
        moved = layer.encode(x, scale, noise=noise)
    assert (moved - codes).abs().max() > 1e-3  # the exponents act


def _windowed(window: int = 3, seed: int = 0) -> CSCAutoencoder:
    """The noise-affine test model with a neighbourhood in both stages and exponents of both signs."""
    model = deepen(deepen(_model("noise_affine"), 0, neighbourhood=window), 1, neighbourhood=window)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for stage in model.stages:
            stage.threshold_exponents.copy_(torch.randn(stage.threshold_exponents.shape, generator=gen))
    return model


@pytest.mark.parametrize("form", ["training", "inference"])
def test_a_neighbourhood_starts_from_what_the_model_computes(form):
    before = _model("noise_affine")
    with torch.no_grad():
        before.stages[0].threshold_slopes.copy_(torch.randn(4, 6))
    after = deepen(before, 0, neighbourhood=3)
    assert after.config.stages[0].neighbourhood == 3 and after.config.stages[1].neighbourhood == 0
    assert float(after.stages[0].threshold_exponents.detach().abs().max()) == 0.0
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    scale, sigma = torch.tensor([0.8, 2.0]), torch.tensor([10.0, 40.0])
    with torch.no_grad(), fista_form(form):
        torch.testing.assert_close(after.reconstruct(images, scale, sigma=sigma),
                                   before.reconstruct(images, scale, sigma=sigma), rtol=0, atol=1e-6)


def test_growing_keeps_the_exponents_of_each_step_and_atom():
    model = _windowed()
    old = model.stages[0].threshold_exponents.detach()
    deeper = deepen(model, 0, num_steps=6)
    new = deeper.stages[0].threshold_exponents.detach()
    torch.testing.assert_close(new[:4], old)
    torch.testing.assert_close(new[4:], old[-1:].expand(2, -1))
    wider = widen(model, 0, 2, perturb=0.0)
    torch.testing.assert_close(wider.stages[0].threshold_exponents.detach(), old.repeat(1, 2))
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor([15.0, 30.0])
    with torch.no_grad():  # the copies hold z / c at thresholds over c: the same ratios, the same output
        torch.testing.assert_close(wider.reconstruct(images, 1.0, sigma=sigma),
                                   model.reconstruct(images, 1.0, sigma=sigma), rtol=0, atol=2e-5)
    removed = deepen(model, 0, neighbourhood=0)
    assert removed.config.stages[0].neighbourhood == 0 and not hasattr(removed.stages[0], "threshold_exponents")


def test_config_checks_the_window_and_writes_it_only_where_set(tmp_path):
    with pytest.raises(ConfigError, match="neighbourhood must be 0 or odd"):
        StageConfig(num_atoms=4, kernel_size=3, learned_steps=True, thresholds="per_atom", neighbourhood=2)
    with pytest.raises(ConfigError, match="needs per-atom thresholds"):
        StageConfig(num_atoms=4, kernel_size=3, learned_steps=True, neighbourhood=3)
    with pytest.raises(ConfigError, match="integer >= 0"):
        StageConfig(num_atoms=4, kernel_size=3, learned_steps=True, thresholds="per_atom", neighbourhood=-1)
    model = _windowed()
    model.save_pretrained(tmp_path / "m")
    stages = json.loads((tmp_path / "m" / "config.json").read_text())["architecture"]["stages"]
    assert [s["neighbourhood"] for s in stages] == [3, 3]
    again = CSCAutoencoder.from_pretrained(tmp_path / "m")
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([5.0, 30.0])
    with torch.no_grad():
        torch.testing.assert_close(again.reconstruct(images, 1.3, sigma=sigma),
                                   model.reconstruct(images, 1.3, sigma=sigma))
    _model("noise_affine").save_pretrained(tmp_path / "p")
    assert "neighbourhood" not in (tmp_path / "p" / "config.json").read_text()


def test_exponents_learn_with_the_thresholds():
    layer = _layer("noise_affine")
    with torch.no_grad():
        layer.threshold_exponents.zero_()
    assert any(p is layer.threshold_exponents for p in layer.threshold_parameters())
    x = torch.randn(2, 3, 12, 16, generator=torch.Generator().manual_seed(6))
    codes = layer.encode(x, 1.0, form="training", noise=torch.tensor([0.0, 0.1]))
    (layer.decode(codes) - x).pow(2).mean().backward()
    assert float(layer.threshold_exponents.grad.abs().max()) > 0


def test_onnx_graphs_match_torch_with_per_position_thresholds(tmp_path):
    model = _windowed().eval()
    manifest = export_onnx(model, tmp_path / "art", weights_sha256=weights_sha256(model))
    for entry in manifest["onnx"]["graphs"].values():
        assert entry["parity"]["max_abs_error"] <= TOL
        assert check_tensorrt_compatible(tmp_path / "art" / entry["file"]) == []  # what TensorRT 10 parses
    graph = manifest["onnx"]["graphs"]["reconstruct"]
    ops = {node.op_type for node in onnx.load(str(tmp_path / "art" / graph["file"])).graph.node}
    assert {"AveragePool", "Sqrt", "Log", "Exp"} <= ops
    session = ort.InferenceSession(str(tmp_path / "art" / graph["file"]), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(7).random((2, 3, 20, 24), dtype=np.float32)
    scale, sigma = np.array([1.0, 2.5], np.float32), np.array([10.0, 45.0], np.float32)
    got = session.run(None, {"images": images, "lmbda_scale": scale, "sigma": sigma})[0]  # then zero counts
    with torch.no_grad():
        want = model.reconstruct(torch.from_numpy(images), torch.from_numpy(scale), sigma=torch.from_numpy(sigma))
        plain = deepen(deepen(model, 0, neighbourhood=0), 1, neighbourhood=0).reconstruct(
            torch.from_numpy(images), torch.from_numpy(scale), sigma=torch.from_numpy(sigma))
    np.testing.assert_allclose(got, want.numpy(), atol=TOL)
    assert np.abs(got - plain.numpy()).max() > 1e-3


def test_csc_grow_neighbourhood_writes_the_model_and_refuses_bad_windows(tmp_path, capsys):
    source = tmp_path / "src"
    _model("noise_affine").save_pretrained(source)
    out = tmp_path / "grown"
    assert main(["grow", str(source), "--out", str(out), "--stage", "2", "--neighbourhood", "3"]) == 0
    assert "over 3x3 neighbourhoods" in capsys.readouterr().out
    assert CSCAutoencoder.from_pretrained(out).config.stages[1].neighbourhood == 3
    with pytest.raises(SystemExit):
        main(["grow", str(source), "--out", str(tmp_path / "g2"), "--neighbourhood", "2"])
    assert "must be 0 or an odd positive integer, got 2" in capsys.readouterr().err
    shared = tmp_path / "shared"
    _model().save_pretrained(shared)
    assert main(["grow", str(shared), "--out", str(tmp_path / "g3"), "--neighbourhood", "3"]) == 1
    assert "needs per-atom thresholds" in capsys.readouterr().err
    assert not (tmp_path / "g3").exists()
