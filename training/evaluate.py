"""Evaluation: mean PSNR and code sparsity of a model on a folder of images, for reconstruction or denoising.

Noise follows the convention of the published tables: white Gaussian noise of std ``sigma / 255`` added in
float to images in [0, 1], no clipping, no rounding; PSNR (``csc_serve.models.psnr``) is measured per image
against the clean image with the estimate clipped to [0, 1] (peak 1), then averaged over images. The noise of
image ``i`` comes from ``seed`` and ``i`` alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from csc_serve.models import CSCAutoencoder, psnr
from csc_serve.models.noise import estimate_noise_sigma


@dataclass
class EvalResult:
    task: str
    sigma: float | None
    psnr: float
    zero_fraction: float
    images: int
    per_image: list[float] = field(default_factory=list)
    sigma_estimates: list[float] = field(default_factory=list)
    seconds_per_image: float = 0.0

    def summary(self) -> str:
        what = "reconstruct" if self.task == "reconstruct" else f"denoise sigma={self.sigma:g}"
        line = (f"{what}: PSNR {self.psnr:.2f} dB, zero codes {100 * self.zero_fraction:.1f}% over {self.images} "
                f"images, {self.seconds_per_image:.2f} s per image")
        if self.sigma_estimates:
            line += f" (blind: mean estimated sigma {sum(self.sigma_estimates) / len(self.sigma_estimates):.2f})"
        return line


def noisy_copy(image: torch.Tensor, sigma: float, seed: int, index: int) -> torch.Tensor:
    """``image + sigma/255 * n`` with ``n`` drawn from (seed, index): the same noise on every run."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    noise = torch.randn(image.shape, generator=gen, dtype=image.dtype).to(image.device)  # drawn on CPU everywhere
    return image + sigma / 255.0 * noise


@torch.no_grad()
def evaluate_images(
    model: CSCAutoencoder,
    images: Sequence[torch.Tensor],
    task: str = "reconstruct",
    sigma: float = 0.0,
    seed: int = 0,
    blind: bool = False,
    lmbda_scale: float | None = None,
    progress: bool = False,
) -> EvalResult:
    """Evaluate on ``images`` (each (C, H, W) in [0, 1]); ``task`` is ``reconstruct`` or ``denoise``.
    ``seconds_per_image`` is the mean wall time of the output's computation (the shift-averaged reconstruction,
    or the encoding and decoding), without the noise, the noise estimate or the PSNR.

    Denoising uses the model's calibrated scale for ``sigma`` (or for its own estimate when ``blind``) unless
    ``lmbda_scale`` is given; reconstruction uses ``lmbda_scale`` or 1.
    """
    if task not in ("reconstruct", "denoise"):
        raise ValueError(f"task must be 'reconstruct' or 'denoise', got {task!r}")
    if task == "denoise" and not (0 < sigma <= 255 and math.isfinite(sigma)):
        raise ValueError(f"denoising needs 0 < sigma <= 255 (0..255 scale), got {sigma}")
    scores, zeros, total, estimates, seconds = [], 0, 0, [], 0.0
    for i, clean in enumerate(tqdm(images, desc=task, unit="img", disable=not progress)):
        x = clean.unsqueeze(0)
        inp = noisy_copy(x, sigma, seed, i) if task == "denoise" else x
        if lmbda_scale is not None:
            scale = torch.tensor([float(lmbda_scale)])
        elif task == "denoise":
            if blind:
                level = estimate_noise_sigma(inp)
                estimates.append(float(level[0]))
            else:
                level = torch.tensor([sigma])
            scale = model.lmbda_scale_for_sigma(level)
        else:
            scale = torch.ones(1)
        start = time.perf_counter()
        codes = model.encode(inp, scale)
        if model.config.shift_average:
            start = time.perf_counter()  # what is served is the shift average, whose codes are its own
            out = model.reconstruct(inp, scale)
        else:
            out = model.decode(codes, output_size=tuple(x.shape[-2:]))
        seconds += time.perf_counter() - start
        scores.append(float(psnr(out, x, clip=True, per_image=True)[0]))
        zeros += int((codes == 0).sum())
        total += codes.numel()
    return EvalResult(
        task=task,
        sigma=sigma if task == "denoise" else None,
        psnr=sum(scores) / len(scores),
        zero_fraction=zeros / max(total, 1),
        images=len(scores),
        per_image=scores,
        sigma_estimates=estimates,
        seconds_per_image=seconds / max(len(scores), 1),
    )


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
            outs = [psnr(model.reconstruct(n, torch.full((len(n),), value)), x, clip=True, per_image=True)
                    for n, x in zip(noisy, clean)]
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
    """Make ``lmbda_scale`` 1 what ``factor`` was: every stage's per-atom weights grow by ``factor`` and the
    calibrated scales of every noise level (sigma > 0) shrink by it, so every threshold ``lmbda * w * scale``
    of a calibrated denoising at or above the first knot is unchanged (below it the map now runs from the new
    reconstruction setting). Returns the new calibration (``model.config`` is not changed)."""
    for stage in model.stages:
        stage.lmbda_weights.mul_(factor)
    knots = model.config.noise_calibration or ()
    return tuple((sigma, scale if sigma == 0 else scale / factor) for sigma, scale in knots)
