import numpy as np
import pytest
import torch

from csc_serve.models import CSCLayer
from tests.reference import lasso_objective, optimality_violation, solve_lasso, synthesis_matrix

BOUNDARIES = ["zeros", "circular"]
STRIDES = [1, 2]


def make_layer(channels, stride, padding_mode, nonnegative=True, kernel_size=3, num_atoms=4, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = CSCLayer(
        channels, num_atoms, kernel_size, stride=stride, padding_mode=padding_mode, nonnegative=nonnegative, **kwargs
    )
    return layer.double()


def image(channels, size, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(2, channels, size, size, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("padding_mode", BOUNDARIES)
@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("channels,kernel_size", [(1, 3), (3, 5)])
def test_decode_is_the_convolution_written_from_its_definition(padding_mode, stride, channels, kernel_size):
    layer = make_layer(channels, stride, padding_mode, kernel_size=kernel_size)
    size = 10
    codes = torch.randn(1, layer.num_atoms, size // stride, size // stride, dtype=torch.float64)
    a_mat = synthesis_matrix(layer.dictionary.detach().numpy(), size, size, stride, padding_mode)
    expected = a_mat @ codes.flatten().numpy()
    np.testing.assert_allclose(layer.decode(codes).flatten().detach().numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("padding_mode", BOUNDARIES)
@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("channels,kernel_size,size", [(1, 3, 8), (3, 5, 12), (2, 7, 14)])
def test_analysis_is_the_exact_adjoint_of_decode(padding_mode, stride, channels, kernel_size, size):
    layer = make_layer(channels, stride, padding_mode, kernel_size=kernel_size, num_atoms=5)
    x = torch.randn(3, channels, size, size, dtype=torch.float64)
    z = torch.randn(3, 5, size // stride, size // stride, dtype=torch.float64)
    lhs = (layer.decode(z) * x).sum()
    rhs = (z * layer.analysis(x)).sum()
    # Float64 sums of a few hundred products: agreement to a few ulps of the magnitude.
    assert torch.isclose(lhs, rhs, rtol=1e-12, atol=1e-12), (lhs.item(), rhs.item())


@pytest.mark.parametrize("padding_mode", BOUNDARIES)
@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("size", [6, 10, 20])
def test_step_size_bounds_the_lipschitz_constant_of_the_actual_operator(padding_mode, stride, size):
    layer = make_layer(3, stride, padding_mode, kernel_size=5, num_atoms=6)
    layer.update_step_size()
    a_mat = synthesis_matrix(layer.dictionary.detach().numpy(), size, size, stride, padding_mode)
    exact = np.linalg.norm(a_mat, 2) ** 2
    assert float(layer.lipschitz) >= exact
    if size >= 20:  # one bound serves every size, so it is loose on small images, but not on large ones
        assert float(layer.lipschitz) <= 1.12 * exact


@pytest.mark.parametrize("padding_mode", BOUNDARIES)
@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("nonnegative", [True, False])
@pytest.mark.parametrize("channels", [1, 3])
def test_many_steps_reach_the_lasso_optimum_of_an_independent_solver(padding_mode, stride, nonnegative, channels):
    size, lmbda, mu = 8, 0.05, 0.0
    layer = make_layer(channels, stride, padding_mode, nonnegative, lmbda=lmbda, num_steps=3000, seed=channels)
    x = image(channels, size)[:1]
    codes = layer.encode(x).detach()

    a_mat = synthesis_matrix(layer.dictionary.detach().numpy(), size, size, stride, padding_mode)
    xv, zv = x.flatten().numpy(), codes.flatten().numpy()
    reference = solve_lasso(a_mat, xv, lmbda, mu, nonnegative)
    ours, best = lasso_objective(a_mat, xv, zv, lmbda, mu), lasso_objective(a_mat, xv, reference, lmbda, mu)
    # The objective agrees to far better than the 1e-4 we promise; the reference is a float64 optimum.
    assert abs(ours - best) <= 1e-6 * abs(best)
    assert abs(layer.objective(x, codes).item() - ours) <= 1e-10 * abs(ours)
    # Codes converge more slowly than the objective where the active atoms are nearly collinear.
    np.testing.assert_allclose(zv, reference, atol=2e-3)
    if nonnegative:
        assert zv.min() >= 0
    else:
        assert zv.min() < 0  # signed codes are really used


@pytest.mark.parametrize("padding_mode", BOUNDARIES)
@pytest.mark.parametrize("nonnegative", [True, False])
@pytest.mark.parametrize("mu", [0.0, 0.3])
def test_converged_codes_satisfy_the_optimality_conditions(padding_mode, nonnegative, mu):
    lmbda = 0.08
    layer = make_layer(3, 2, padding_mode, nonnegative, kernel_size=5, lmbda=lmbda, mu=mu, num_steps=4000)
    x = image(3, 12)[:1]
    codes = layer.encode(x).detach()
    a_mat = synthesis_matrix(layer.dictionary.detach().numpy(), 12, 12, 2, padding_mode)
    xv, zv = x.flatten().numpy(), codes.flatten().numpy()
    assert (zv != 0).any() and (zv == 0).any()  # both kinds of condition are exercised
    # Subgradient conditions hold to 1e-6 of lmbda after 4000 steps of an O(1/k^2) method.
    assert optimality_violation(a_mat, xv, zv, lmbda, mu, nonnegative) < 1e-6 * lmbda
    reference = solve_lasso(a_mat, xv, lmbda, mu, nonnegative)
    best = lasso_objective(a_mat, xv, reference, lmbda, mu)
    assert abs(lasso_objective(a_mat, xv, zv, lmbda, mu) - best) <= 1e-6 * best


@pytest.mark.parametrize("nonnegative", [True, False])
def test_per_atom_weights_give_the_optimum_of_the_weighted_lasso(nonnegative):
    lmbda = 0.08
    layer = make_layer(3, 2, "zeros", nonnegative, kernel_size=5, num_atoms=4, lmbda=lmbda, num_steps=4000)
    with torch.no_grad():
        layer.lmbda_weights.copy_(torch.tensor([0.0, 0.5, 1.0, 3.0]))
    x = image(3, 12)[:1]
    codes = layer.encode(x).detach()  # (1, 4, 6, 6)
    a_mat = synthesis_matrix(layer.dictionary.detach().numpy(), 12, 12, 2, "zeros")
    xv, zv = x.flatten().numpy(), codes.flatten().numpy()
    weights = np.repeat(lmbda * layer.lmbda_weights.detach().numpy(), 36)  # codes flatten atom by atom
    # An unweighted solve would violate these conditions by about lmbda (the weights differ by that much).
    assert optimality_violation(a_mat, xv, zv, weights, 0.0, nonnegative) < 1e-6 * lmbda
    assert (codes[0, 3] == 0).float().mean() > (codes[0, 1] == 0).float().mean()  # heavier weight, sparser map
    reference = solve_lasso(a_mat, xv, weights, 0.0, nonnegative)
    best = lasso_objective(a_mat, xv, reference, weights)
    assert abs(lasso_objective(a_mat, xv, zv, weights) - best) <= 1e-6 * best
    expected = lasso_objective(a_mat, xv, zv, weights)
    assert float(layer.objective(x, codes).detach()) == pytest.approx(expected, rel=1e-10)


def test_few_steps_do_not_reach_the_optimum_and_more_steps_lower_the_objective():
    x = image(3, 16)
    objectives = []
    for steps in (1, 2, 5, 20, 100):
        layer = make_layer(3, 1, "zeros", kernel_size=5, num_atoms=8, lmbda=0.05, num_steps=steps)
        objectives.append(layer.objective(x, layer.encode(x)).sum().item())
    assert all(a > b for a, b in zip(objectives, objectives[1:])), objectives


@pytest.mark.parametrize("padding_mode", BOUNDARIES)
@pytest.mark.parametrize("nonnegative", [True, False])
def test_per_sample_lmbda_scale_in_one_batch_equals_separate_calls(padding_mode, nonnegative):
    layer = make_layer(3, 2, padding_mode, nonnegative, kernel_size=5, num_atoms=6, lmbda=0.05, num_steps=10)
    x = torch.rand(3, 3, 12, 12, dtype=torch.float64)
    scales = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    batched = layer.encode(x, scales)
    for i in range(3):
        alone = layer.encode(x[i : i + 1], scales[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(batched[0], layer.encode(x[:1], scales[2:3])[0])
    torch.testing.assert_close(layer.encode(x, None), layer.encode(x, torch.ones(3, dtype=torch.float64)))


@pytest.mark.parametrize("nonnegative", [True, False])
def test_larger_lmbda_scale_gives_sparser_codes(nonnegative):
    layer = make_layer(3, 1, "zeros", nonnegative, kernel_size=5, num_atoms=8, lmbda=0.02, num_steps=20)
    x = image(3, 16)
    zero_fraction = [(layer.encode(x, s) == 0).double().mean().item() for s in (0.5, 1.0, 2.0, 4.0, 8.0)]
    assert all(a < b for a, b in zip(zero_fraction, zero_fraction[1:])), zero_fraction


@pytest.mark.parametrize("padding_mode", BOUNDARIES)
@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("nonnegative", [True, False])
def test_gradients_flow_through_the_unrolled_steps(padding_mode, stride, nonnegative):
    layer = make_layer(2, stride, padding_mode, nonnegative, kernel_size=3, num_atoms=3, lmbda=0.02, num_steps=4)
    x = torch.rand(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    layer.update_step_size()
    weight = layer.dictionary.detach().clone().requires_grad_(True)
    thresh = layer.threshold(x, torch.tensor([1.0, 1.5], dtype=torch.float64)).detach()
    # Float64 finite differences through 4 unrolled steps (ReLU kinks are not hit at random points).
    assert torch.autograd.gradcheck(lambda x, w: layer.fista(x, w, thresh), (x, weight))
    codes = layer.encode(x)
    codes.pow(2).sum().backward()
    assert layer.dictionary.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


@pytest.mark.parametrize("kernel_size,stride", [(3, 1), (11, 2)])
def test_a_wholly_new_dictionary_gets_a_valid_step_size(kernel_size, stride):
    layer = make_layer(1, stride, "circular", kernel_size=kernel_size, num_atoms=8)
    layer.update_step_size()
    layer.update_step_size(num_iters=5)  # warm tracking leaves a vector tuned to the old dictionary
    with torch.no_grad():
        layer.dictionary.copy_(torch.randn_like(layer.dictionary))
    layer.normalize_dictionary()
    size = 8 * stride if kernel_size < 8 else 24
    a_mat = synthesis_matrix(layer.dictionary.detach().numpy(), size, size, stride, "circular")
    assert layer.ensure_step_size() >= np.linalg.norm(a_mat, 2) ** 2


def test_stale_step_size_is_refreshed_when_the_dictionary_changes():
    layer = make_layer(1, 1, "zeros")
    before = layer.update_step_size()
    with torch.no_grad():
        layer.dictionary.mul_(3.0)  # L scales by 9
    layer.encode(torch.rand(1, 1, 8, 8, dtype=torch.float64))
    assert float(layer.lipschitz) == pytest.approx(9 * before, rel=1e-2)
    layer.dictionary.data = layer.dictionary.data / 3.0
    layer.encode(torch.rand(1, 1, 8, 8, dtype=torch.float64))
    assert float(layer.lipschitz) == pytest.approx(before, rel=1e-2)


def test_normalize_dictionary_gives_unit_norm_atoms():
    layer = make_layer(3, 1, "zeros", kernel_size=5, num_atoms=7)
    with torch.no_grad():
        layer.dictionary.mul_(torch.rand(7, 1, 1, 1, dtype=torch.float64) * 5)
    layer.normalize_dictionary()
    norms = layer.dictionary.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(7, dtype=torch.float64))
    assert layer.dictionary.shape == (7, 3, 5, 5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"kernel_size": 4}, "odd"),
        ({"stride": 0}, "stride"),
        ({"stride": 5, "kernel_size": 3}, "stride"),
        ({"padding_mode": "reflect"}, "padding_mode"),
        ({"num_steps": 0}, "num_steps"),
        ({"lmbda": -1.0}, "lmbda"),
    ],
)
def test_invalid_layer_arguments_are_refused(kwargs, message):
    args = {"in_channels": 1, "num_atoms": 2, "kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        CSCLayer(**args)


@pytest.mark.parametrize(
    "shape,message", [((1, 2, 8, 8), "expected input"), ((1, 1, 7, 8), "multiples"), ((1, 1, 2, 2), "circular")]
)
def test_badly_shaped_inputs_are_refused(shape, message):
    layer = make_layer(1, 2 if message == "multiples" else 1, "circular", kernel_size=5)
    with pytest.raises(ValueError, match=message):
        layer.encode(torch.rand(shape, dtype=torch.float64))


def test_lmbda_scale_of_the_wrong_shape_is_refused():
    layer = make_layer(1, 1, "zeros")
    with pytest.raises(ValueError, match="lmbda_scale"):
        layer.encode(torch.rand(2, 1, 8, 8, dtype=torch.float64), torch.ones(3, dtype=torch.float64))


def test_a_deep_copy_keeps_its_step_size_and_still_tracks_changes(monkeypatch):
    import copy

    layer = make_layer(1, 1, "zeros")
    before = layer.update_step_size()
    clone = copy.deepcopy(layer)
    calls = []
    monkeypatch.setattr(type(clone), "update_step_size", lambda self, *a, **k: calls.append(self) or 0.0)
    assert clone.ensure_step_size() == pytest.approx(before) and calls == []  # no new power iteration
    with torch.no_grad():
        clone.dictionary.mul_(2.0)
    clone.ensure_step_size()
    assert calls == [clone]  # the copy's own dictionary changes are still seen
    assert float(layer.lipschitz) == pytest.approx(before)


def test_a_forced_fista_form_holds_only_in_its_own_thread_and_asyncio_task():
    import asyncio
    import threading

    from csc_serve.models.fista import current_form, fista_form

    seen = {}
    with torch.no_grad(), fista_form("training"):
        def elsewhere():
            with torch.no_grad():
                seen["thread"] = current_form()

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        seen["here"] = current_form()
    assert seen == {"here": "training", "thread": "inference"}

    async def task(form):
        with fista_form(form):
            await asyncio.sleep(0)  # the other tasks set their own forms meanwhile
            return current_form()

    async def tasks():
        return await asyncio.gather(task("training"), task("folded"), task(None), task("inference"))

    with torch.no_grad():
        assert asyncio.run(tasks()) == ["training", "folded", "inference", "inference"]
        assert current_form() == "inference"


@pytest.mark.parametrize("form", ["training", "folded", "inference"])
def test_an_explicit_form_argument_is_the_form_fista_form_selects(form):
    from csc_serve.models import CSCAutoencoder, fista_form
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = CSCAutoencoder(tiny_config(nonnegative=False))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        with fista_form(form):
            expected = model.reconstruct(x, 2.0), model.encode(x, 2.0)
        other = "training" if form != "training" else "folded"
        with fista_form(other):  # the argument wins over the context
            assert torch.equal(model.reconstruct(x, 2.0, form=form), expected[0])
            assert torch.equal(model.encode(x, 2.0, form=form), expected[1])
    with pytest.raises(ValueError, match="form must be"):
        model.encode(x, form="fast")
