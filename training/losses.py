r"""Rate-reduction terms of the CTRL objective, on feature rows normalised to the unit sphere.

Notation: ``Z`` is an ``(n, d)`` matrix whose ``n`` rows are ``d``-dimensional features (samples as
rows), ``eps > 0`` is the allowed distortion, and ``Pi`` is a partition of the rows into classes
``Z_j`` of ``n_j`` rows each.

Coding rate (bits, up to the constant 1/ln 2, to code ``Z`` up to distortion ``eps``)::

    R(Z) = 1/2 logdet(I_d + d / (n eps^2) Z^T Z)

Compression rate of the partition::

    R_c(Z | Pi) = sum_j n_j / (2 n) logdet(I_d + d / (n_j eps^2) Z_j^T Z_j)     (empty classes: 0)

Rate reduction (class-conditional mode): ``Delta R = R(Z) - R_c(Z | Pi)``, which is ``>= 0`` by the
concavity of logdet.

CTRL's binary mode compares real features ``Z`` with the features ``Z_hat`` of their reconstructions::

    Delta R(Z, Z_hat) = R(Z u Z_hat) - 1/2 (R(Z) + R(Z_hat))

where ``Z u Z_hat`` is the row concatenation. The weights ``1/2`` are those of ``R_c`` for a two-class
partition with equal halves (``n_j / (2 n) * 2 = 1/2`` when both sets hold ``n/2`` rows); the same
weights are used whatever the two row counts. Its class-conditional form sums it over the classes::

    sum_j Delta R(Z_j, Z_hat_j)

Why the smaller form: by Sylvester's determinant identity
``logdet(I_d + a Z^T Z) = logdet(I_n + a Z Z^T)``, so each logdet is taken on the ``min(n, d)``-square
Gram matrix; the scale ``a`` keeps the true ``d`` and ``n`` whichever form is used. The matrix is
``I + a G`` with ``G`` positive semi-definite, so its eigenvalues are ``>= 1`` and the Cholesky factor
``L`` always exists: ``logdet = 2 sum_i log L_ii``.
"""

from __future__ import annotations

import torch

__all__ = [
    "binary_rate_reduction",
    "class_rate_reduction",
    "coding_rate",
    "compression_rate",
    "flatten_features",
    "rate_reduction",
]

# Rows with a smaller norm are left (numerically) as they are: an all-zero row stays zero, not NaN.
_MIN_NORM = 1e-12


def flatten_features(codes: torch.Tensor) -> torch.Tensor:
    """Flatten ``(B, ...)`` codes to ``(B, d)`` rows and scale each row to unit L2 norm.

    ``z_i <- z_i / max(||z_i||_2, 1e-12)``: CTRL measures rates of features on the sphere, and the
    clamp keeps an all-zero row at zero.
    """
    if codes.dim() < 2:
        raise ValueError(f"codes must be (B, ...) with at least one feature dimension, got {tuple(codes.shape)}")
    rows = codes.flatten(1)  # (B, d)
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min(_MIN_NORM)  # (B, 1)
    return rows / norms


def _check_features(features: torch.Tensor, eps: float) -> None:
    if features.dim() != 2:
        raise ValueError(f"features must be (n, d) with samples as rows, got {tuple(features.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")


def _logdet_identity_plus_gram(features: torch.Tensor, scale: float) -> torch.Tensor:
    """``logdet(I + scale Z^T Z)`` for ``Z = features`` ``(n, d)``, on the smaller Gram matrix.

    In at least float32 and outside autocast: bfloat16 features (``--bf16``) keep 8 bits of mantissa, too
    few for a Gram matrix and its Cholesky factor.
    """
    n, d = features.shape
    with torch.autocast(features.device.type, enabled=False):
        features = features.to(torch.promote_types(features.dtype, torch.float32))
        gram = features @ features.T if n < d else features.T @ features  # (m, m), m = min(n, d)
        eye = torch.eye(gram.shape[0], dtype=features.dtype, device=features.device)
        chol = torch.linalg.cholesky(eye + scale * gram)  # (m, m) lower triangular
        return 2.0 * torch.log(torch.diagonal(chol)).sum()


def coding_rate(features: torch.Tensor, eps: float) -> torch.Tensor:
    """``R(Z) = 1/2 logdet(I_d + d / (n eps^2) Z^T Z)`` of ``(n, d)`` features; 0 when ``n = 0``."""
    _check_features(features, eps)
    n, d = features.shape
    if n == 0:
        return features.new_zeros(())
    return 0.5 * _logdet_identity_plus_gram(features, d / (n * eps**2))


def _class_masks(labels: torch.Tensor, n: int, num_classes: int | None) -> list[torch.Tensor]:
    """One boolean ``(n,)`` row mask per class that has at least one row."""
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must be ({n},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    present = torch.unique(labels).tolist()
    if present and (present[0] < 0 or (num_classes is not None and present[-1] >= num_classes)):
        raise ValueError(f"labels must lie in [0, {num_classes}), got values {present[0]}..{present[-1]}")
    return [labels == j for j in present]


def compression_rate(
    features: torch.Tensor, labels: torch.Tensor, eps: float, num_classes: int | None = None
) -> torch.Tensor:
    """``R_c(Z | Pi) = sum_j n_j / (2 n) logdet(I + d / (n_j eps^2) Z_j^T Z_j)``.

    ``features`` is ``(n, d)``, ``labels`` the ``(n,)`` integer class of each row; a class with no
    rows contributes 0. ``num_classes``, when given, bounds the labels.
    """
    _check_features(features, eps)
    n, d = features.shape
    total = features.new_zeros(())
    for mask in _class_masks(labels, n, num_classes):
        members = features[mask]  # (n_j, d)
        n_j = members.shape[0]
        total = total + n_j / (2 * n) * _logdet_identity_plus_gram(members, d / (n_j * eps**2))
    return total


def rate_reduction(
    features: torch.Tensor, labels: torch.Tensor, eps: float, num_classes: int | None = None
) -> torch.Tensor:
    """``Delta R = R(Z) - R_c(Z | Pi)`` of ``(n, d)`` features partitioned by ``(n,)`` labels."""
    return coding_rate(features, eps) - compression_rate(features, labels, eps, num_classes)


def binary_rate_reduction(real: torch.Tensor, reconstructed: torch.Tensor, eps: float) -> torch.Tensor:
    """``Delta R(Z, Z_hat) = R(Z u Z_hat) - 1/2 (R(Z) + R(Z_hat))``, CTRL's label-free mode.

    ``real`` is ``(n, d)`` and ``reconstructed`` ``(m, d)``; ``Z u Z_hat`` is their ``(n + m, d)`` row
    concatenation. The weights 1/2 are the equal-halves form (the compression rate of a two-class
    partition when ``n = m``). For ``n = m`` it is ``>= 0``: the union's matrix is the average of
    ``I + d / (n eps^2) Z^T Z`` and its ``Z_hat`` counterpart, and logdet is concave. Identical sets
    give 0: ``Z u Z`` has Gram ``2 Z^T Z`` over ``2 n`` rows, the very matrix of ``R(Z)``.
    """
    _check_features(real, eps)
    _check_features(reconstructed, eps)
    if real.shape[1] != reconstructed.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} and {reconstructed.shape[1]}")
    union = torch.cat([real, reconstructed], dim=0)  # (n + m, d)
    return coding_rate(union, eps) - 0.5 * (coding_rate(real, eps) + coding_rate(reconstructed, eps))


def class_rate_reduction(
    real: torch.Tensor,
    reconstructed: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    num_classes: int | None = None,
) -> torch.Tensor:
    """``sum_j Delta R(Z_j, Z_hat_j)``: the binary rate reduction taken within each class.

    ``real`` and ``reconstructed`` are ``(n, d)`` with row ``i`` of ``reconstructed`` the
    reconstruction of row ``i`` of ``real``, so the ``(n,)`` labels pick ``Z_j`` and ``Z_hat_j`` alike.
    Classes with no rows contribute 0.
    """
    if real.shape != reconstructed.shape:
        shapes = f"{tuple(real.shape)} and {tuple(reconstructed.shape)}"
        raise ValueError(f"real and reconstructed must have the same shape, got {shapes}")
    _check_features(real, eps)
    total = real.new_zeros(())
    for mask in _class_masks(labels, real.shape[0], num_classes):
        total = total + binary_rate_reduction(real[mask], reconstructed[mask], eps)
    return total
