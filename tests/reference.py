"""Independent references for the tests: the synthesis operator written as a dense matrix straight from the
definition of convolution, and a Lasso solver (coordinate descent, then an exact solve on the support)."""

from __future__ import annotations

import numpy as np


def synthesis_matrix(dictionary: np.ndarray, height: int, width: int, stride: int, padding_mode: str) -> np.ndarray:
    """Dense ``A`` with ``x = A z``: ``x[c, s*m + a - p, s*n + b - p] += D[k, c, a, b] * z[k, m, n]``.

    Rows index the image ``(C, H, W)``, columns the codes ``(K, H/s, W/s)``, both in C order. Out-of-range
    rows are dropped for the zero boundary and wrapped for the circular one.
    """
    num_atoms, channels, ksize, _ = dictionary.shape
    pad = (ksize - 1) // 2
    hz, wz = height // stride, width // stride
    a_mat = np.zeros((channels * height * width, num_atoms * hz * wz))
    for k in range(num_atoms):
        for m in range(hz):
            for n in range(wz):
                col = (k * hz + m) * wz + n
                for a in range(ksize):
                    for b in range(ksize):
                        i, j = stride * m + a - pad, stride * n + b - pad
                        if padding_mode == "circular":
                            i, j = i % height, j % width
                        elif not (0 <= i < height and 0 <= j < width):
                            continue
                        for c in range(channels):
                            a_mat[(c * height + i) * width + j, col] += dictionary[k, c, a, b]
    return a_mat


def lasso_objective(a_mat, x, z, lmbda, mu=0.0):
    """``lmbda`` is a scalar or one weight per coefficient (the weighted l1 penalty)."""
    r = x - a_mat @ z
    return 0.5 * r @ r + (lmbda * np.abs(z)).sum() + 0.5 * mu * z @ z


def solve_lasso(a_mat, x, lmbda, mu=0.0, nonnegative=False, sweeps=20000, tol=1e-14):
    """Minimise ``0.5||x - A z||^2 + sum_j lmbda_j |z_j| + mu/2 ||z||^2`` (``z >= 0`` if asked), to float64
    precision; ``lmbda`` is a scalar or one value per coefficient."""
    lmbda = np.broadcast_to(np.asarray(lmbda, dtype=np.float64), (a_mat.shape[1],))
    gram = a_mat.T @ a_mat + mu * np.eye(a_mat.shape[1])
    corr = a_mat.T @ x
    diag = np.diag(gram).copy()
    z = np.zeros(a_mat.shape[1])
    gz = np.zeros_like(z)  # gram @ z, kept up to date
    for _ in range(sweeps):
        biggest = 0.0
        for j in range(z.size):
            rho = corr[j] - gz[j] + diag[j] * z[j]
            new = max(rho - lmbda[j], 0.0) if nonnegative else np.sign(rho) * max(abs(rho) - lmbda[j], 0.0)
            new /= diag[j]
            delta = new - z[j]
            if delta:
                gz += delta * gram[:, j]
                z[j] = new
                biggest = max(biggest, abs(delta))
        if biggest < 1e-10:
            break
    # Polish: on the support the optimality conditions are linear, G_SS z_S = corr_S - lmbda sign(z_S).
    support = np.abs(z) > 0
    if support.any():
        polished = np.zeros_like(z)
        rhs = corr[support] - lmbda[support] * np.sign(z[support])
        polished[support] = np.linalg.solve(gram[np.ix_(support, support)], rhs)
        if np.all(np.sign(polished[support]) == np.sign(z[support])):
            if lasso_objective(a_mat, x, polished, lmbda, mu) <= lasso_objective(a_mat, x, z, lmbda, mu):
                z = polished
    return z


def optimality_violation(a_mat, x, z, lmbda, mu=0.0, nonnegative=False) -> float:
    """Largest violation of the Lasso subgradient conditions, ``g = A^T (A z - x) + mu z``:
    ``g_j = -lmbda sign(z_j)`` where ``z_j != 0``; ``|g_j| <= lmbda`` (or ``g_j >= -lmbda`` if ``z >= 0``) where 0."""
    lmbda = np.broadcast_to(np.asarray(lmbda, dtype=np.float64), z.shape)
    g = a_mat.T @ (a_mat @ z - x) + mu * z
    active = z != 0
    on_support = np.abs(g[active] + lmbda[active] * np.sign(z[active]))
    off, lam_off = g[~active], lmbda[~active]
    off_support = np.maximum(-off - lam_off, 0.0) if nonnegative else np.maximum(np.abs(off) - lam_off, 0.0)
    return float(max(on_support.max(initial=0.0), off_support.max(initial=0.0)))
