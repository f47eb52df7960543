"""The map from a Gaussian noise level to the threshold scale that removes it: one formula for training (torch,
differentiable in the knots), models and the service (numpy, no PyTorch needed)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    pass

SCALE_FLOOR = 1e-3  # the map is kept positive


def interpolate_scale(sigma, knot_sigma, knot_scale):
    """Piecewise-linear ``lmbda_scale(sigma)`` through the knots, extended linearly past the last one.

    ``sigma`` (B,) on the 0..255 scale; ``knot_sigma`` (N,) strictly increasing from 0; ``knot_scale`` (N,).
    Torch tensors (differentiable in ``knot_scale``, so training can learn the map) or numpy arrays (float64).
    The result is kept at or above ``SCALE_FLOOR``.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(knot_scale, torch.Tensor):
        sigma = sigma.to(knot_scale.dtype).clamp_min(0)
        # Segment of each sigma; the last segment also serves sigmas past the last knot.
        index = torch.bucketize(sigma, knot_sigma[1:-1].contiguous(), right=True)  # (B,) in 0 .. N-2
    else:
        sigma = np.maximum(np.asarray(sigma, np.float64), 0)
        knot_sigma, knot_scale = np.asarray(knot_sigma, np.float64), np.asarray(knot_scale, np.float64)
        index = np.searchsorted(knot_sigma[1:-1], sigma, side="right")
    s0, s1 = knot_sigma[index], knot_sigma[index + 1]
    v0, v1 = knot_scale[index], knot_scale[index + 1]
    t = (sigma - s0) / (s1 - s0)
    scale = v0 + t * (v1 - v0)
    return scale.clamp_min(SCALE_FLOOR) if torch is not None and isinstance(scale, torch.Tensor) \
        else np.maximum(scale, SCALE_FLOOR)


def scale_for_sigma(knots: Sequence[tuple[float, float]], sigma) -> np.ndarray:
    """The calibrated ``lmbda_scale`` of a config's ``noise_calibration`` knots for noise levels ``sigma``
    (a number or an array, 0..255): float64 of ``sigma``'s shape, at least 1-d."""
    knot_sigma, knot_scale = np.asarray(knots, np.float64).T
    return interpolate_scale(np.atleast_1d(np.asarray(sigma, np.float64)), knot_sigma, knot_scale)
