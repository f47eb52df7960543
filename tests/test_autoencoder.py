import copy

import pytest
import torch

from csc_serve.models import ConfigError, CSCAutoencoder, CSCConfig, StageConfig, autoencoder
from tests.conftest import tiny_config


def test_encode_gives_last_stage_codes_and_every_stage_on_request(tiny_model, images):
    codes = tiny_model.encode(images)
    assert codes.shape == (3, 8, 10, 12)
    stages = tiny_model.encode(images, all_stages=True)
    assert [tuple(z.shape) for z in stages] == [(3, 6, 20, 24), (3, 8, 10, 12)]
    torch.testing.assert_close(stages[-1], codes, rtol=0, atol=0)
    assert all((z >= 0).all() for z in stages)


def test_stage_l_codes_the_codes_of_stage_l_minus_1(tiny_model, images):
    first, second = tiny_model.encode(images, all_stages=True)
    torch.testing.assert_close(tiny_model.stages[1].encode(first), second, rtol=0, atol=0)


def test_decode_is_the_synthesis_back_through_the_same_dictionaries(tiny_model, images):
    codes = tiny_model.encode(images)
    d1, d2 = (stage.dictionary for stage in tiny_model.stages)
    by_hand = torch.nn.functional.conv_transpose2d(codes, d2, stride=2, padding=1, output_padding=1)
    by_hand = torch.nn.functional.conv_transpose2d(by_hand, d1, padding=2)
    torch.testing.assert_close(tiny_model.decode(codes), by_hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("height,width", [(20, 24), (17, 23), (1, 1), (5, 2)])
def test_any_image_size_is_padded_and_cropped_back(tiny_model, height, width):
    x = torch.rand(2, 3, height, width)
    codes = tiny_model.encode(x)
    assert codes.shape[-2:] == (-(-height // 2), -(-width // 2))
    out = tiny_model.reconstruct(x)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (0, width % 2, 0, height % 2), mode="replicate")
    full = tiny_model.reconstruct(padded)
    torch.testing.assert_close(out, full[..., :height, :width], rtol=0, atol=0)


def test_input_mean_is_removed_before_coding_and_restored_after(images):
    torch.manual_seed(0)
    centred = CSCAutoencoder(tiny_config(input_mean=(0.4, 0.5, 0.6), nonnegative=False))
    torch.manual_seed(0)
    plain = CSCAutoencoder(tiny_config(nonnegative=False))
    mean = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
    torch.testing.assert_close(centred.encode(images), plain.encode(images - mean))
    codes = plain.encode(images)
    torch.testing.assert_close(centred.decode(codes), plain.decode(codes) + mean)


def test_per_sample_lmbda_scale_matches_separate_calls_through_every_stage(tiny_model, images):
    scales = torch.tensor([0.5, 1.0, 4.0])
    batched = tiny_model.reconstruct(images, scales)
    for i in range(3):
        alone = tiny_model.reconstruct(images[i : i + 1], scales[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-5, atol=1e-6)
    sparsity = [(tiny_model.encode(images[:1], s) == 0).float().mean().item() for s in (0.5, 1.0, 4.0)]
    assert sparsity[0] < sparsity[1] < sparsity[2]


def _shifted_mean(model: CSCAutoencoder, x: torch.Tensor, scale) -> torch.Tensor:
    """The mean of the plain reconstructions of every shift of ``x``, one shift at a time."""
    s, (h, w) = model.config.total_stride, x.shape[-2:]
    outs = []
    for dy in range(s):
        for dx in range(s):
            shifted = torch.nn.functional.pad(x, (dx, s - dx, dy, s - dy), mode="replicate")
            outs.append(model.decode(model.encode(shifted, scale))[..., dy : dy + h, dx : dx + w])
    return torch.stack(outs).mean(0)


@pytest.mark.parametrize("height,width,pass_pixels", [(20, 24, 1 << 18), (17, 9, 1 << 18), (20, 24, 1), (17, 9, 2000)])
def test_shift_average_is_the_mean_over_every_shift_of_the_stride(height, width, pass_pixels, monkeypatch):
    # Every shift in one pass, one shift per pass, and passes of a few shifts (the last one shorter).
    monkeypatch.setattr(autoencoder, "SHIFT_PASS_PIXELS", pass_pixels)
    torch.manual_seed(0)
    model = CSCAutoencoder(tiny_config(shift_average=True, nonnegative=False)).eval()
    x = torch.rand(3, 3, height, width, generator=torch.Generator().manual_seed(1))
    scales = torch.tensor([0.5, 1.0, 4.0])
    out = model.reconstruct(x, scales)
    assert out.shape == x.shape
    expected = torch.cat([_shifted_mean(model, x[i : i + 1], scales[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # The average is not the unshifted reconstruction: the grid of a strided model is not shift invariant.
    plain = model.decode(model.encode(x, scales), output_size=(height, width))
    assert (out - plain).abs().max() > 1e-3
    torch.testing.assert_close(model.reconstruct(x, 2.0), model.reconstruct(x, torch.full((3,), 2.0)))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        model.reconstruct(x, torch.ones(2))


def test_training_keeps_atoms_unit_norm_and_step_sizes_fresh(tiny_model, images):
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=0.5)
    loss = (tiny_model.reconstruct(images) - images).pow(2).mean()
    loss.backward()
    before = [float(stage.lipschitz) for stage in tiny_model.stages]
    optimizer.step()
    tiny_model.normalize_dictionaries()
    after = tiny_model.update_step_sizes()
    assert after != before
    for stage in tiny_model.stages:
        torch.testing.assert_close(stage.dictionary.flatten(1).norm(dim=1), torch.ones(stage.num_atoms))


@pytest.mark.parametrize(
    "shape,message", [((2, 1, 8, 8), "expected images"), ((2, 3, 0, 8), "at least one pixel"), ((3, 8, 8), "expected")]
)
def test_bad_image_shapes_are_refused(tiny_model, shape, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.encode(torch.rand(shape))


def test_codes_with_the_wrong_number_of_atoms_are_refused(tiny_model):
    with pytest.raises(ValueError, match="expected codes"):
        tiny_model.decode(torch.rand(1, 5, 4, 4))


def test_config_round_trips_through_a_dict():
    config = tiny_config(input_mean=(0.1, 0.2, 0.3), provenance={"data": "cbsd68"})
    again = CSCConfig.from_dict(config.to_dict())
    assert again == config and again.provenance == {"data": "cbsd68"}
    assert config.total_stride == 2 and config.code_channels == 8


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.update(extra=1), "unknown field"),
        (lambda d: d["stages"][0].update(atoms=3), "unknown field"),
        (lambda d: d["stages"][0].update(kernel_size=4), "odd"),
        (lambda d: d["stages"][1].update(num_steps=0), "num_steps"),
        (lambda d: d["stages"][0].update(lmbda=float("nan")), "lmbda"),
        (lambda d: d["stages"][0].pop("num_atoms"), "num_atoms"),
        (lambda d: d.update(stages=[]), "at least one stage"),
        (lambda d: d.update(padding_mode="reflect"), "padding_mode"),
        (lambda d: d.update(value_range=[1, 0]), "value_range"),
        (lambda d: d.update(input_mean=[0.5]), "input_mean"),
        (lambda d: d.update(in_channels=True), "in_channels"),
        (lambda d: d.update(shift_average="yes"), "shift_average"),
    ],
)
def test_malformed_configs_are_refused_with_the_reason(change, message):
    data = tiny_config().to_dict()
    change(data)
    with pytest.raises(ConfigError, match=message):
        CSCConfig.from_dict(data)


def test_stage_config_accepts_only_valid_stages():
    with pytest.raises(ConfigError, match="stride"):
        StageConfig(num_atoms=4, kernel_size=3, stride=5)


def _mapped(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``q`` (3, 3) applied to the colour vector of every pixel of ``x`` (B, 3, H, W)."""
    return torch.einsum("ck,bkij->bcij", q, x)


def _in_colour_space(model: CSCAutoencoder, q: torch.Tensor) -> CSCAutoencoder:
    """A copy of ``model`` whose stage-1 atoms and input mean live in the colour space ``q @ rgb``."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        first = out.stages[0].dictionary
        first.copy_(_mapped(q, first))  # (atoms, 3, k, k): the colour axis is the second, as in images
        out.input_mean.copy_(_mapped(q, out.input_mean))
    return out


def test_an_orthonormal_colour_map_changes_nothing_a_skewed_one_does():
    # Signed codes: the data term, D^T x, the Gram D^T D and each FISTA step are invariant when an orthonormal
    # colour map moves the image and the atoms together (the colour row of models/pretrained/README.md).
    model = CSCAutoencoder.from_pretrained("csc-ctrl-rgb")
    assert model.config.nonnegative is False
    x = torch.rand(1, 3, 36, 44, generator=torch.Generator().manual_seed(0))
    opponent = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, -1.0], [1.0, -2.0, 1.0]])
    opponent = opponent / opponent.norm(dim=1, keepdim=True)  # CBM3D's opponent transform, orthonormal rows
    ycbcr = torch.tensor([[0.299, 0.587, 0.114], [-0.169, -0.331, 0.5], [0.5, -0.419, -0.081]])
    with torch.no_grad():
        rgb = model.denoise(x, 25.0)
        for q, same in ((opponent, True), (ycbcr, False)):
            back = _mapped(torch.linalg.inv(q), _in_colour_space(model, q).denoise(_mapped(q, x), 25.0))
            assert bool((back - rgb).abs().max() < 1e-5) is same
