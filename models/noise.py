"""Additive white Gaussian noise: synthesise it, and estimate its level from a single image."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

if TYPE_CHECKING:
    import torch

__all__ = ["add_gaussian_noise", "estimate_noise_sigma"]

# Patches beyond this are subsampled on a regular grid: enough for the eigenvalues of a covariance
# of dimension d <= 3 * 8 * 8 to sit within a few percent of their limit (d / n < 2e-3).
MAX_PATCHES = 100_000
# Fewer patches than this many per dimension and the small eigenvalues are biased low by the
# Marchenko-Pastur spread (1 -/+ sqrt(d / n))^2, about 50 % at d / n = 1/4.
MIN_PATCHES_PER_DIM = 4


def add_gaussian_noise(
    images: torch.Tensor, sigma: float | torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Return ``images + sigma / 255 * n`` with ``n`` standard normal, neither clipped nor rounded.

    That is the convention of the published denoising tables (BM3D, DnCNN, ...): the noisy image
    may leave [0, 1]. ``images`` (B, C, H, W) or (C, H, W) in [0, 1]; ``sigma`` on the 0..255 scale,
    a scalar or a (B,) tensor with one level per image. ``generator`` must live on the images' device.
    """
    import torch

    if not images.is_floating_point():
        images = images.float()
    sigma = torch.as_tensor(sigma, dtype=images.dtype, device=images.device)
    if sigma.ndim == 1:
        if images.ndim != 4 or sigma.shape[0] != images.shape[0]:
            raise ValueError(f"per-image sigma {tuple(sigma.shape)} needs images (B, C, H, W) with that B")
        sigma = sigma.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    elif sigma.ndim != 0:
        raise ValueError(f"sigma must be a scalar or (B,), got shape {tuple(sigma.shape)}")
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype, device=images.device)
    return images + sigma / 255.0 * noise


def estimate_noise_sigma(images: np.ndarray | torch.Tensor, patch_size: int = 7) -> np.ndarray | torch.Tensor:
    r"""Standard deviation of additive white Gaussian noise in each image, on the 0..255 scale.

    The patch-PCA method of G. Chen, F. Zhu and P. A. Heng, "An Efficient Statistical Method for
    Image Noise Level Estimation", ICCV 2015. Every ``p x p`` patch across all ``C`` channels is a
    vector in :math:`\mathbb{R}^d`, :math:`d = C p^2`. Clean patches of a natural image lie close to
    a low-dimensional subspace, so of the eigenvalues :math:`e_1 \le \dots \le e_d` of the patch
    covariance, the smallest ones belong to directions that carry noise only and are all
    :math:`\approx \sigma^2`. Those redundant eigenvalues behave like a sample of a symmetric
    distribution, whose mean equals its median, whereas adding any signal eigenvalue drags the
    mean above the median. Hence, for :math:`r = d, d-1, \dots, 1`:

    .. math::
        \tau_r = \frac{1}{r} \sum_{i \le r} e_i, \qquad
        \text{stop at the first } r \text{ with }
        \#\{i \le r : e_i > \tau_r\} \ge \#\{i \le r : e_i < \tau_r\},

    i.e. the mean :math:`\tau_r` is no longer above the median of :math:`e_1, \dots, e_r`, and
    :math:`\hat\sigma = \sqrt{\tau_r}` (the paper's code asks for equality; ``\ge`` also stops when
    ties or an even ``r`` never balance the counts exactly). One pass, no iteration, no training.

    ``images`` (B, C, H, W) or (C, H, W), floats in [0, 1], a numpy array or a torch tensor (on any device);
    returns (B,) float64 of the same kind (a tensor on the CPU; B = 1 for a single image), each image estimated
    on its own. The arithmetic is numpy's either way, so serving needs no PyTorch for it. Above
    ``MAX_PATCHES`` patches the patch grid is subsampled with a regular stride, which is deterministic and
    leaves the estimate unchanged within the sampling error. Raises ``ValueError`` for a wrong rank or an
    image too small for ``MIN_PATCHES_PER_DIM * d`` patches.
    """
    is_tensor = not isinstance(images, np.ndarray) and type(images).__module__.startswith("torch")
    array = images.detach().cpu().numpy() if is_tensor else np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W) or (C, H, W), got shape {tuple(array.shape)}")
    if patch_size < 2:
        raise ValueError(f"patch_size must be at least 2, got {patch_size}")
    _, channels, height, width = array.shape
    dim = channels * patch_size * patch_size
    rows, cols = height - patch_size + 1, width - patch_size + 1
    if rows < 1 or cols < 1 or rows * cols < MIN_PATCHES_PER_DIM * dim:
        raise ValueError(
            f"image {height}x{width} too small for {patch_size}x{patch_size} patches over {channels} channels:"
            f" needs at least {MIN_PATCHES_PER_DIM * dim} patches"
        )
    stride = max(1, math.ceil(math.sqrt(rows * cols / MAX_PATCHES)))
    if math.ceil(rows / stride) * math.ceil(cols / stride) < MIN_PATCHES_PER_DIM * dim:
        stride = 1
    sigmas = np.array([_sigma_from_patches(_patches(image, patch_size, stride)) for image in array]) * 255.0
    if is_tensor:
        import torch

        return torch.from_numpy(sigmas)
    return sigmas


def _patches(image: np.ndarray, patch_size: int, stride: int) -> np.ndarray:
    """(C, H, W) -> (N, C * p * p) float32 patch vectors on a grid with the given stride."""
    windows = sliding_window_view(image.astype(np.float32, copy=False), (patch_size, patch_size), axis=(1, 2))
    windows = windows[:, ::stride, ::stride]  # (C, rows, cols, p, p)
    return windows.transpose(1, 2, 0, 3, 4).reshape(-1, image.shape[0] * patch_size * patch_size)


def _sigma_from_patches(patches: np.ndarray) -> float:
    """Chen-Zhu-Heng noise level (0..1 scale) from (N, d) patches.

    The covariance is summed in float32 over centred patches (relative error ~1e-6 of its entries, far below
    the sampling error of the estimate) and decomposed in float64.
    """
    centred = patches - patches.mean(axis=0)  # (N, d)
    covariance = (centred.T @ centred).astype(np.float64) / patches.shape[0]  # (d, d)
    eigenvalues = np.linalg.eigvalsh(covariance)  # (d,) ascending
    d = eigenvalues.size
    ranks = np.arange(1, d + 1)
    tau = np.cumsum(eigenvalues) / ranks  # tau[r - 1] = mean of e_1..e_r
    # Row r - 1 counts, among e_1..e_r, the eigenvalues above and below tau_r: every r at once.
    inside = ranks[None, :] <= ranks[:, None]  # (d, d): column i is within the first r
    above = ((eigenvalues[None, :] > tau[:, None]) & inside).sum(1)
    below = ((eigenvalues[None, :] < tau[:, None]) & inside).sum(1)
    stops = np.flatnonzero((above >= below)[1:])  # candidates r = 2..d
    if stops.size == 0:
        return math.sqrt(max(float(eigenvalues[0]), 0.0))  # r = 1: a single eigenvalue is its own median
    return math.sqrt(max(float(tau[int(stops[-1]) + 1]), 0.0))  # the largest r that stops
