import numpy as np
import pytest
import torch

from csc_serve.training.losses import (
    binary_rate_reduction,
    class_rate_reduction,
    coding_rate,
    compression_rate,
    flatten_features,
    rate_reduction,
)

SHAPES = [(5, 40), (40, 5), (16, 16)]  # n < d, n > d, n = d
EPS = [0.5, 0.1]
# float64 throughout: the two sides differ only by the order of a few hundred flops on O(10) values.
RTOL64 = 1e-10


def unit_rows(n, d, seed):
    rows = np.random.default_rng(seed).standard_normal((n, d))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def labels_for(n, num_classes, seed):
    """Every class gets a row, the rest drawn at random."""
    rest = np.random.default_rng(seed).integers(0, num_classes, n - num_classes)
    return np.concatenate([np.arange(num_classes), rest])


def np_rate(z, eps):
    """R(Z) = 1/2 logdet(I_d + d/(n eps^2) Z^T Z), always on the d x d form."""
    n, d = z.shape
    if n == 0:
        return 0.0
    sign, logdet = np.linalg.slogdet(np.eye(d) + d / (n * eps**2) * z.T @ z)
    assert sign > 0
    return 0.5 * logdet


def np_compression(z, labels, eps):
    n, d = z.shape
    total = 0.0
    for j in np.unique(labels):
        z_j = z[labels == j]
        n_j = len(z_j)
        total += n_j / (2 * n) * np.linalg.slogdet(np.eye(d) + d / (n_j * eps**2) * z_j.T @ z_j)[1]
    return total


def np_binary(z, z_hat, eps):
    return np_rate(np.concatenate([z, z_hat]), eps) - 0.5 * (np_rate(z, eps) + np_rate(z_hat, eps))


def as_torch(*arrays):
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("n,d", SHAPES)
def test_coding_rate_matches_the_d_by_d_logdet(n, d, eps):
    z = unit_rows(n, d, seed=0)
    (z_t,) = as_torch(z)
    np.testing.assert_allclose(coding_rate(z_t, eps).item(), np_rate(z, eps), rtol=RTOL64)


@pytest.mark.parametrize("n,d", SHAPES)
def test_sylvester_identity_makes_both_forms_equal_to_the_function(n, d):
    z, eps = unit_rows(n, d, seed=1), 0.5
    a = d / (n * eps**2)
    rate_dd = 0.5 * np.linalg.slogdet(np.eye(d) + a * z.T @ z)[1]
    rate_nn = 0.5 * np.linalg.slogdet(np.eye(n) + a * z @ z.T)[1]
    np.testing.assert_allclose(rate_dd, rate_nn, rtol=RTOL64)
    (z_t,) = as_torch(z)
    np.testing.assert_allclose(coding_rate(z_t, eps).item(), rate_nn, rtol=RTOL64)


@pytest.mark.parametrize("eps", EPS)
@pytest.mark.parametrize("n,d", SHAPES)
def test_compression_and_rate_reduction_match_numpy(n, d, eps):
    z, labels = unit_rows(n, d, seed=2), labels_for(n, 3, seed=2)
    z_t, labels_t = as_torch(z, labels)
    expected_rc = np_compression(z, labels, eps)
    np.testing.assert_allclose(compression_rate(z_t, labels_t, eps).item(), expected_rc, rtol=RTOL64)
    np.testing.assert_allclose(
        rate_reduction(z_t, labels_t, eps, num_classes=3).item(), np_rate(z, eps) - expected_rc, rtol=RTOL64
    )


def test_an_empty_class_contributes_nothing_to_compression():
    z = unit_rows(12, 6, seed=3)
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 3, 3, 3, 3, 3])  # class 2 of 4 is empty
    z_t, labels_t = as_torch(z, labels)
    with_empty = compression_rate(z_t, labels_t, 0.5, num_classes=4)
    relabelled = compression_rate(z_t, torch.where(labels_t == 3, 2, labels_t), 0.5, num_classes=3)
    np.testing.assert_allclose(with_empty.item(), np_compression(z, labels, 0.5), rtol=RTOL64)
    np.testing.assert_allclose(with_empty.item(), relabelled.item(), rtol=RTOL64)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n,d", SHAPES)
def test_rate_reduction_is_nonnegative_on_random_data(n, d, seed):
    z_t, labels_t = as_torch(unit_rows(n, d, seed), labels_for(n, 4, seed))
    assert rate_reduction(z_t, labels_t, 0.5).item() >= 0


@pytest.mark.parametrize("m", [None, 3])  # None: as many reconstructions as real rows
@pytest.mark.parametrize("n,d", SHAPES)
def test_binary_rate_reduction_matches_numpy(n, d, m):
    z, z_hat = unit_rows(n, d, seed=4), unit_rows(m or n, d, seed=5)
    z_t, z_hat_t = as_torch(z, z_hat)
    value = binary_rate_reduction(z_t, z_hat_t, 0.5).item()
    np.testing.assert_allclose(value, np_binary(z, z_hat, 0.5), rtol=RTOL64)
    if m is None:
        assert value >= 0  # equal halves: logdet of an average >= average of logdets


@pytest.mark.parametrize("n,d", SHAPES)
def test_binary_rate_reduction_of_identical_sets_is_the_formula_value_zero(n, d):
    z = unit_rows(n, d, seed=6)
    z_t, z_copy = as_torch(z, z.copy())
    value = binary_rate_reduction(z_t, z_copy, 0.5).item()
    # Z u Z has Gram 2 Z^T Z over 2n rows: the matrix of R(Z), so the formula itself gives 0.
    expected = np_binary(z, z, 0.5)
    np.testing.assert_allclose(expected, 0.0, atol=1e-12)
    np.testing.assert_allclose(value, expected, atol=1e-12)  # absolute: the value is a difference of O(10) terms


@pytest.mark.parametrize("n,d", SHAPES)
def test_class_rate_reduction_is_the_sum_of_per_class_binary_reductions(n, d):
    z, z_hat, labels = unit_rows(n, d, seed=7), unit_rows(n, d, seed=8), labels_for(n, 3, seed=7)
    labels[labels == 1] = 2  # class 1 of 3 left empty
    z_t, z_hat_t, labels_t = as_torch(z, z_hat, labels)
    expected = sum(np_binary(z[labels == j], z_hat[labels == j], 0.5) for j in np.unique(labels))
    value = class_rate_reduction(z_t, z_hat_t, labels_t, 0.5, num_classes=3)
    np.testing.assert_allclose(value.item(), expected, rtol=RTOL64)


def test_flatten_features_gives_unit_rows_and_keeps_a_zero_row_zero():
    codes = torch.randn(4, 3, 5, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    codes[2] = 0.0
    codes.requires_grad_(True)
    feats = flatten_features(codes)  # (4, 90)
    assert feats.shape == (4, 90)
    norms = feats.detach().norm(dim=1)
    np.testing.assert_allclose(norms[[0, 1, 3]].numpy(), 1.0, rtol=1e-12)  # float64 rounding of a 90-term sum
    assert torch.equal(feats[2].detach(), torch.zeros(90, dtype=torch.float64))
    (grad,) = torch.autograd.grad(coding_rate(feats, 0.5), codes)
    assert torch.isfinite(grad).all()


LOSSES = {
    "coding_rate": lambda z, z_hat, y: coding_rate(z, 0.5),
    "compression_rate": lambda z, z_hat, y: compression_rate(z, y, 0.5),
    "rate_reduction": lambda z, z_hat, y: rate_reduction(z, y, 0.5),
    "binary_rate_reduction": lambda z, z_hat, y: binary_rate_reduction(z, z_hat, 0.5),
    "class_rate_reduction": lambda z, z_hat, y: class_rate_reduction(z, z_hat, y, 0.5),
}


def inputs_requiring_grad(n, d, seed):
    z, z_hat, labels = as_torch(unit_rows(n, d, seed), unit_rows(n, d, seed + 1), labels_for(n, 2, seed))
    return z.requires_grad_(True), z_hat.requires_grad_(True), labels


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("name", LOSSES)
def test_gradients_with_respect_to_the_features_are_finite(name, n, d):
    z, z_hat, labels = inputs_requiring_grad(n, d, seed=10)
    grads = torch.autograd.grad(LOSSES[name](z, z_hat, labels), (z, z_hat), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("n,d", [(3, 5), (5, 3)])  # both Gram forms; tiny, as gradcheck perturbs every entry
@pytest.mark.parametrize("name", LOSSES)
def test_gradients_match_finite_differences(name, n, d):
    z, z_hat, labels = inputs_requiring_grad(n, d, seed=12)
    assert torch.autograd.gradcheck(lambda a, b: LOSSES[name](a, b, labels), (z, z_hat), fast_mode=True)


@pytest.mark.parametrize("name", LOSSES)
def test_float32_input_gives_float32_close_to_float64(name):
    z, z_hat, labels = as_torch(unit_rows(16, 40, seed=12), unit_rows(16, 40, seed=13), labels_for(16, 3, seed=12))
    loss = LOSSES[name]
    value32 = loss(z.float(), z_hat.float(), labels)
    assert value32.dtype == torch.float32
    # float32 Cholesky of a well-conditioned (eigenvalues >= 1) matrix: a few ulps per log term.
    np.testing.assert_allclose(value32.item(), loss(z, z_hat, labels).item(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "call",
    [
        lambda z, y: coding_rate(z, 0.0),
        lambda z, y: coding_rate(z[0], 0.5),
        lambda z, y: compression_rate(z, y[:-1], 0.5),
        lambda z, y: compression_rate(z, y.double(), 0.5),
        lambda z, y: rate_reduction(z, y, 0.5, num_classes=2),
        lambda z, y: rate_reduction(z, y - 1, 0.5),
        lambda z, y: binary_rate_reduction(z, z[:, :3], 0.5),
        lambda z, y: class_rate_reduction(z, z[:-1], y, 0.5),
        lambda z, y: flatten_features(z[0]),
    ],
)
def test_invalid_inputs_raise_value_error(call):
    z, labels = as_torch(unit_rows(8, 6, seed=14), labels_for(8, 3, seed=14))
    with pytest.raises(ValueError):
        call(z, labels)
