"""The map from a Gaussian noise level to the threshold scale that removes it."""

from __future__ import annotations

import torch


def interpolate_scale(sigma: torch.Tensor, knot_sigma: torch.Tensor, knot_scale: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear ``lmbda_scale(sigma)`` through the knots, extended linearly past the last one.

    ``sigma`` (B,) on the 0..255 scale; ``knot_sigma`` (N,) strictly increasing from 0; ``knot_scale`` (N,).
    Differentiable in ``knot_scale``, so training can learn the map. The result is kept positive.
    """
    sigma = sigma.to(knot_scale.dtype).clamp_min(0)
    # Segment of each sigma; the last segment also serves sigmas past the last knot.
    index = torch.bucketize(sigma, knot_sigma[1:-1].contiguous(), right=True)  # (B,) in 0 .. N-2
    s0, s1 = knot_sigma[index], knot_sigma[index + 1]
    v0, v1 = knot_scale[index], knot_scale[index + 1]
    t = (sigma - s0) / (s1 - s0)
    return (v0 + t * (v1 - v0)).clamp_min(1e-3)
