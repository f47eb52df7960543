"""Fitting a model's noise map and reconstruction setting on held-out images: the sigma -> ``lmbda_scale`` knots
by line and golden-section search (``refine_calibration``, ``csc calibrate``), the sparsest ``lmbda_scale`` that
still reconstructs at a target PSNR (``sparsest_reconstruction_scale``), and the move that makes it the model's
``lmbda_scale`` 1 (``move_reconstruction_setting``). The map itself is ``csc_serve.models.calibration``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm import tqdm

from csc_serve.models import CSCAutoencoder, psnr

from .evaluate import evaluate_images, noisy_copy


@torch.no_grad()
def refine_calibration(
    model: CSCAutoencoder, images: Sequence[torch.Tensor], seed: int = 0, steps: int = 9, span: float = 2.0,
    refine: int = 0, progress: bool = False,
) -> tuple[tuple[float, float], ...]:
    """Line search of ``lmbda_scale`` at every calibration knot (sigma > 0) for the best mean PSNR on
    ``images``: candidates ``scale * span**t`` for ``t`` evenly spaced on [-1, 1], then ``refine`` more by
    golden-section search of ``log(scale)`` between the neighbours of the best candidate (each one shrinks
    that bracket by 0.618). Returns the new knots (``model.config`` is not changed): at each knot the scale of
    the best PSNR met. ``s(0) = 1`` stays: that is the reconstruction setting.
    """
    knots = list(model.config.noise_calibration)
    factors = [span ** (2 * i / (steps - 1) - 1) for i in range(steps)]
    same_size = len({tuple(x.shape) for x in images}) == 1
    clean = [torch.stack(list(images))] if same_size else [x.unsqueeze(0) for x in images]
    bar = tqdm(total=sum(1 for s, _ in knots if s > 0) * (steps + refine), desc="calibrate", unit="try",
               disable=not progress)
    for k, (sigma, scale) in enumerate(knots):
        if sigma == 0:
            continue
        noisy = [torch.cat([noisy_copy(x[i : i + 1], sigma, seed, i) for i in range(len(x))]) for x in clean]
        tried: dict[float, float] = {}

        def score(log_scale: float) -> float:
            value = math.exp(log_scale)
            outs = [psnr(model.reconstruct(n, torch.full((len(n),), value), sigma=torch.full((len(n),), sigma)), x,
                         clip=True, per_image=True) for n, x in zip(noisy, clean)]
            tried[value] = float(torch.cat(outs).mean())
            bar.update(1)
            return tried[value]

        logs = [math.log(scale * f) for f in factors]
        best = max(range(steps), key=lambda i: score(logs[i]))
        if refine > 0 and steps > 1:
            gap = logs[1] - logs[0]
            _golden_section(score, logs[best] - gap, logs[best] + gap, refine)
        knots[k] = (sigma, max(tried, key=tried.get))
    bar.close()
    return tuple(knots)


def _golden_section(score, low: float, high: float, evaluations: int) -> None:
    """``evaluations`` calls of ``score`` that close in on a maximum of a unimodal function on [low, high]."""
    ratio = (math.sqrt(5) - 1) / 2
    points: list[tuple[float, float]] = []  # interior (position, score) pairs, left then right
    while evaluations > 0:
        if not points:
            position = high - ratio * (high - low)
        elif len(points) == 1:
            position = low + ratio * (high - low)
        else:
            (c, fc), (d, fd) = points
            if fc >= fd:  # the maximum lies in [low, d]
                high, points = d, [(c, fc)]
                position = high - ratio * (high - low)
            else:  # in [c, high]
                low, points = c, [(d, fd)]
                position = low + ratio * (high - low)
        points.append((position, score(position)))
        points.sort()
        evaluations -= 1


@torch.no_grad()
def sparsest_reconstruction_scale(
    model: CSCAutoencoder, images: Sequence[torch.Tensor], target_psnr: float, top: float = 1e4, steps: int = 12
) -> float:
    """The largest ``lmbda_scale`` in ``[1, top]`` whose mean reconstruction PSNR on ``images`` is at least
    ``target_psnr`` (bisection on its logarithm, ``steps`` evaluations, to within a factor ``top^(2^-steps)``,
    0.2% by default; PSNR falls as the scale grows). 1.0 when scale 1 already misses the target. A model
    trained with clean crops may reconstruct nearly losslessly at scale 1, so the search reaches far."""
    def passes(scale: float) -> bool:
        return evaluate_images(model, images, "reconstruct", lmbda_scale=scale).psnr >= target_psnr

    if not passes(1.0):
        return 1.0
    if passes(top):
        return top
    low, high = 0.0, math.log(top)  # passes at exp(low), fails at exp(high)
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if passes(math.exp(middle)) else (low, middle)
    return math.exp(low)


@torch.no_grad()
def move_reconstruction_setting(model: CSCAutoencoder, factor: float) -> tuple[tuple[float, float], ...]:
    """Make ``lmbda_scale`` 1 what ``factor`` was: every stage's ``lmbda`` grows by ``factor`` (in the layers and
    in ``model.config``) and the calibrated scales of every noise level (sigma > 0) shrink by it, so every
    threshold ``lmbda * w * scale`` of a calibrated denoising at or above the first knot is unchanged (below it
    the map now runs from the new reconstruction setting). Returns the new calibration (the config's
    ``noise_calibration`` is not changed)."""
    model.set_lmbdas([stage.lmbda * factor for stage in model.stages])
    knots = model.config.noise_calibration or ()
    return tuple((sigma, scale if sigma == 0 else scale / factor) for sigma, scale in knots)
