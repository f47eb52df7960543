"""Growing a model (``csc_serve.models.grow.widen``, ``regrid``, ``csc grow``): the grown model computes what the
model computes, its copies of an atom move apart only when asked, a denser grid holds the old one, and bad
requests are one-line errors."""

import dataclasses
import json

import pytest
import torch

from csc_serve.cli.main import main
from csc_serve.models import CSCAutoencoder, StageConfig, load_pretrained
from csc_serve.models.grow import deepen, regrid, widen

from .conftest import tiny_config

TOL = 2e-5


def _model(padding_mode="zeros", learned=True, seed=0) -> CSCAutoencoder:
    stages = (
        StageConfig(num_atoms=6, kernel_size=5, stride=2, lmbda=0.05, num_steps=5, learned_steps=learned),
        StageConfig(num_atoms=8, kernel_size=1, stride=1, lmbda=0.05, num_steps=3, learned_steps=learned),
    )
    config = tiny_config(stages=stages, padding_mode=padding_mode, nonnegative=False, shift_average=True,
                         input_mean=(0.5, 0.5, 0.5), noise_calibration=((0.0, 1.0), (50.0, 4.0)))
    torch.manual_seed(seed)
    model = CSCAutoencoder(config)
    with torch.no_grad():
        for stage in model.stages:
            stage.lmbda_weights.copy_(torch.rand(stage.num_atoms) + 0.5)
            if learned:
                stage.step_scales.copy_(torch.rand(stage.num_steps) + 0.5)
                stage.threshold_scales.copy_(torch.rand(stage.num_steps) + 0.5)
    model.ensure_step_sizes()
    return model.eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(2, 3, 18, 22, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
@pytest.mark.parametrize("learned", [True, False])
@pytest.mark.parametrize("factor,kernel", [(2, None), (3, 7)])
def test_widening_the_first_stage_keeps_every_output(padding_mode, learned, factor, kernel, x):
    model = _model(padding_mode, learned)
    grown = widen(model, 0, factor, kernel)
    first = grown.config.stages[0]
    assert first.num_atoms == 6 * factor and first.kernel_size == (kernel or 5)
    assert grown.stages[1].in_channels == 6 * factor
    # L' = factor * L: the nonzero spectrum of D' D'^T = factor D D^T.
    assert float(grown.stages[0].lipschitz) == pytest.approx(factor * float(model.stages[0].lipschitz), rel=2e-3)
    with torch.no_grad():
        scale = torch.tensor([0.5, 3.0])
        before, after = model.encode(x, scale, all_stages=True), grown.encode(x, scale, all_stages=True)
        # Every copy of code i holds z_i / factor; the next stage's codes are the original over sqrt(factor).
        for copy in after[0].chunk(factor, dim=1):
            torch.testing.assert_close(copy, before[0] / factor, atol=TOL, rtol=0)
        torch.testing.assert_close(after[1], before[1] / factor**0.5, atol=TOL, rtol=0)
        torch.testing.assert_close(grown.reconstruct(x, scale), model.reconstruct(x, scale), atol=TOL, rtol=0)
        torch.testing.assert_close(grown.denoise(x, 20.0), model.denoise(x, 20.0), atol=TOL, rtol=0)
        with_codes = grown.decode(after[1], output_size=x.shape[-2:])
        torch.testing.assert_close(with_codes, model.decode(before[1], output_size=x.shape[-2:]), atol=TOL, rtol=0)


def test_widening_the_last_stage_keeps_the_reconstruction(x):
    model = _model()
    grown = widen(model, 1, 2)
    assert grown.config.code_channels == 16
    with torch.no_grad():
        codes, old = grown.encode(x, 2.0), model.encode(x, 2.0)
        for copy in codes.chunk(2, dim=1):
            torch.testing.assert_close(copy, old / 2, atol=TOL, rtol=0)
        torch.testing.assert_close(grown.reconstruct(x, 2.0), model.reconstruct(x, 2.0), atol=TOL, rtol=0)


@pytest.mark.parametrize("thresholds", ["per_atom", "noise_affine"])
@pytest.mark.parametrize("stage", [0, 1])
def test_widening_keeps_per_atom_thresholds_with_their_atoms(thresholds, stage, x):
    model = deepen(deepen(_model(), 0, thresholds=thresholds), 1, thresholds=thresholds)
    with torch.no_grad():
        for layer in model.stages:  # every atom its own threshold scale and noise slope
            layer.threshold_scales.copy_(torch.rand_like(layer.threshold_scales) + 0.5)
            if thresholds == "noise_affine":
                layer.threshold_slopes.copy_(torch.randn_like(layer.threshold_slopes))
    grown = widen(model, stage, 3)
    assert grown.stages[stage].threshold_scales.shape == (model.config.stages[stage].num_steps,
                                                         3 * model.config.stages[stage].num_atoms)
    with torch.no_grad():
        scale = torch.tensor([0.5, 3.0])
        torch.testing.assert_close(grown.reconstruct(x, scale), model.reconstruct(x, scale), atol=TOL, rtol=0)
        torch.testing.assert_close(grown.denoise(x, 20.0), model.denoise(x, 20.0), atol=TOL, rtol=0)


def test_larger_atoms_alone_are_the_same_convolutions(x):
    model = _model()
    grown = widen(model, 0, 1, 9)
    atoms = grown.stages[0].dictionary.detach()
    assert atoms.shape == (6, 3, 9, 9)
    assert atoms[..., :2, :].abs().max() == 0 and atoms[..., :, -2:].abs().max() == 0
    torch.testing.assert_close(atoms[..., 2:7, 2:7], model.stages[0].dictionary.detach())
    with torch.no_grad():
        torch.testing.assert_close(grown.reconstruct(x, 1.0), model.reconstruct(x, 1.0), atol=TOL, rtol=0)


def test_perturb_moves_the_copies_apart_by_a_little(x):
    model = _model()
    grown = widen(model, 0, 2, perturb=1e-2, seed=4)
    atoms = grown.stages[0].dictionary.detach()
    first, second = atoms[:6], atoms[6:]
    gap = (first - second).flatten(1).norm(dim=1)
    assert (gap > 1e-3).all() and (gap < 0.5).all()
    torch.testing.assert_close(atoms.flatten(1).norm(dim=1), torch.ones(12))
    # The copies straddle the original atom: their mean points the same way.
    mean = (first + second) / 2
    cosine = torch.nn.functional.cosine_similarity(mean.flatten(1), model.stages[0].dictionary.detach().flatten(1))
    assert (cosine > 0.999).all()
    with torch.no_grad():
        change = (grown.reconstruct(x, 1.0) - model.reconstruct(x, 1.0)).abs().max()
    assert 1e-5 < change < 0.1
    # The same seed gives the same model; another seed another one.
    again, other = widen(model, 0, 2, perturb=1e-2, seed=4), widen(model, 0, 2, perturb=1e-2, seed=5)
    assert torch.equal(again.stages[0].dictionary, grown.stages[0].dictionary)
    assert not torch.equal(other.stages[0].dictionary, grown.stages[0].dictionary)


def test_training_moves_perturbed_copies_differently(x):
    model = _model().train()
    grown = widen(model, 0, 2, perturb=1e-2).train()
    loss = (grown.reconstruct(x + 0.05 * torch.randn_like(x), 1.0) - x).pow(2).mean()
    loss.backward()
    grad = grown.stages[0].dictionary.grad
    assert not torch.allclose(grad[:6], grad[6:])


def test_the_original_model_is_left_as_it_was(x):
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    widen(model, 0, 2, 7, perturb=1e-2)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.config.stages[0].num_atoms == 6


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"stage": 2}, "stage must be between 1 and 2"),
        ({"stage": -1}, "stage must be between 1 and 2"),
        ({"factor": 0}, "factor must be a positive integer"),
        ({"kernel_size": 3}, "kernel_size must be odd and at least the stage's 5"),
        ({"kernel_size": 8}, "kernel_size must be odd"),
        ({"perturb": -1.0}, "perturb must be a non-negative number"),
        ({"perturb": float("nan")}, "perturb must be a non-negative number"),
    ],
)
def test_bad_requests_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        widen(_model(), **kwargs)


def test_csc_grow_writes_a_model_that_loads_and_records_its_command(tmp_path, x, capsys):
    source = tmp_path / "source"
    model = _model()
    model.config = dataclasses.replace(model.config, provenance={"command": "csc train --data somewhere"})
    model.save_pretrained(source)
    out = tmp_path / "grown"
    argv = ["grow", str(source), "--out", str(out), "--factor", "2", "--kernel-size", "7", "--perturb", "0"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "stage 1 has 12 atoms of 7x7" in printed and f"csc train --init {out}" in printed
    grown = load_pretrained(out)
    assert grown.config.stages[0].num_atoms == 12 and grown.config.stages[0].kernel_size == 7
    provenance = json.loads((out / "config.json").read_text())["architecture"]["provenance"]
    assert provenance["command"] == "csc " + " ".join(argv)
    assert provenance["grown_from"] == {"model": str(source), "command": "csc train --data somewhere"}
    with torch.no_grad():
        torch.testing.assert_close(grown.reconstruct(x, 1.0), model.reconstruct(x, 1.0), atol=TOL, rtol=0)

    # An existing model is kept unless --force; a bad stage is a one-line error and writes nothing.
    before = (out / "model.safetensors").read_bytes()
    assert main(["grow", str(source), "--out", str(out), "--factor", "3"]) == 1
    assert "already holds a model" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert main(["grow", str(source), "--out", str(out), "--factor", "3", "--force"]) == 0
    assert load_pretrained(out).config.stages[0].num_atoms == 18
    missing = tmp_path / "never"
    assert main(["grow", str(source), "--out", str(missing), "--stage", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "csc grow: error: stage must be between 1 and 2 (the model has 2), got 3"
    assert not missing.exists()


def test_csc_grow_steps_below_the_current_number_trims_the_stage(tmp_path, x, capsys):
    source, out = tmp_path / "source", tmp_path / "trimmed"
    model = _model()
    model.save_pretrained(source)
    assert main(["grow", str(source), "--out", str(out), "--steps", "3"]) == 0
    assert "3 FISTA steps" in capsys.readouterr().out
    trimmed = load_pretrained(out)
    assert trimmed.config.stages[0].num_steps == 3 and trimmed.config.stages[0].num_atoms == 6
    kept = model.stages[0].step_scales.detach()[[0, 1, 4]]
    torch.testing.assert_close(trimmed.stages[0].step_scales.detach(), kept)


def test_csc_grow_rejects_bad_options_in_argparse(tmp_path, capsys):
    for option in (["--factor", "0"], ["--perturb", "-1"], ["--perturb", "inf"], ["--stage", "zero"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["grow", "csc-ctrl-rgb", "--out", str(tmp_path / "m"), *option])
        assert exit_info.value.code == 2
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_a_denser_grid_holds_the_old_one(padding_mode, x):
    """Codes of the old grid placed at every k-th position of the new one synthesise the same image; the
    lmbdas of the stage and of the stages after it shrink by k^2, everything learned is kept, L is recomputed."""
    model = _model(padding_mode)
    dense = regrid(model, 0, 1)
    assert [s.stride for s in dense.config.stages] == [1, 1]
    assert [s.lmbda for s in dense.config.stages] == pytest.approx([0.05 / 4, 0.05 / 4])
    for old, new in zip(model.stages, dense.stages):
        for name in ("dictionary", "lmbda_weights", "step_scales", "threshold_scales"):
            torch.testing.assert_close(getattr(new, name), getattr(old, name), atol=0, rtol=0)
    fresh = float(dense.stages[0].lipschitz)
    assert fresh == pytest.approx(dense.stages[0].update_step_size(), rel=1e-6)
    assert fresh > 2 * float(model.stages[0].lipschitz)  # about k^2 = 4 times: more atoms overlap each pixel
    with torch.no_grad():
        codes = model.encode(x, 1.0)
        embedded = torch.zeros(*codes.shape[:2], 2 * codes.shape[2], 2 * codes.shape[3])
        embedded[..., ::2, ::2] = codes
        size = tuple(x.shape[-2:])
        torch.testing.assert_close(dense.decode(embedded, size), model.decode(codes, size), atol=TOL, rtol=0)
        assert dense.encode(x, 1.0).shape[-2:] == embedded.shape[-2:]
        assert torch.isfinite(dense.reconstruct(x, 1.0)).all()


def test_regrid_keeps_the_shift_settings_where_they_still_apply():
    base = _model()
    stages = (dataclasses.replace(base.config.stages[0], stride=4), base.config.stages[1])
    model = CSCAutoencoder(dataclasses.replace(base.config, stages=stages, shift_pattern="quincunx"))
    assert len(model.config.shifts) == 8
    half = regrid(model, 0, 2)  # 2 grid shifts per axis: the quincunx still applies
    assert half.config.shift_pattern == "quincunx" and half.config.shifts == [(0, 0), (1, 1)]
    full = regrid(model, 0, 1)  # stride 1: one shift, the grid
    assert full.config.shift_pattern == "grid" and full.config.shifts == [(0, 0)]


@pytest.mark.parametrize("kwargs,message", [
    ({"stride": 3}, "stride must be a positive divisor of the stage's stride 2"),
    ({"stride": 0}, "stride must be a positive divisor"),
    ({"stage": 2, "stride": 1}, "stage must be between 1 and 2"),
])
def test_bad_regrid_requests_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        regrid(_model(), **kwargs)


def test_csc_grow_stride_writes_the_denser_model(tmp_path, capsys):
    source, out = tmp_path / "source", tmp_path / "dense"
    _model().save_pretrained(source)
    assert main(["grow", str(source), "--out", str(out), "--stride", "1"]) == 0
    printed = capsys.readouterr().out
    assert "stage 1 has 6 atoms of 5x5 at stride 1" in printed and "averages 1 shift(s)" in printed
    dense = load_pretrained(out)
    assert dense.config.stages[0].stride == 1 and dense.config.stages[0].num_atoms == 6
    assert main(["grow", str(source), "--out", str(tmp_path / "bad"), "--stride", "3"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("stride must be a positive divisor of the "
                                                                      "stage's stride 2, got 3")
    assert not (tmp_path / "bad").exists()
