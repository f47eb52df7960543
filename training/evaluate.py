"""Evaluation: mean PSNR and code sparsity of a model on a folder of images, for reconstruction or denoising.

Noise follows the convention of the published tables: white Gaussian noise of std ``sigma / 255`` added in
float to images in [0, 1], no clipping, no rounding; PSNR is measured against the clean image with the
estimate clipped to [0, 1] (peak 1). The noise of image ``i`` comes from ``seed`` and ``i`` alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from models import CSCAutoencoder
from models.noise import estimate_noise_sigma


@dataclass
class EvalResult:
    task: str
    sigma: float | None
    psnr: float
    zero_fraction: float
    images: int
    per_image: list[float] = field(default_factory=list)
    sigma_estimates: list[float] = field(default_factory=list)

    def summary(self) -> str:
        what = "reconstruct" if self.task == "reconstruct" else f"denoise sigma={self.sigma:g}"
        line = f"{what}: PSNR {self.psnr:.2f} dB, zero codes {100 * self.zero_fraction:.1f}% over {self.images} images"
        if self.sigma_estimates:
            line += f" (blind: mean estimated sigma {sum(self.sigma_estimates) / len(self.sigma_estimates):.2f})"
        return line


def psnr(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image for signals in [0, 1] (the estimate clipped to that range)."""
    mse = (estimate.clamp(0, 1) - target).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-12))


def noisy_copy(image: torch.Tensor, sigma: float, seed: int, index: int) -> torch.Tensor:
    """``image + sigma/255 * n`` with ``n`` drawn from (seed, index): the same noise on every run."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return image + sigma / 255.0 * torch.randn(image.shape, generator=gen, dtype=image.dtype)


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

    Denoising uses the model's calibrated scale for ``sigma`` (or for its own estimate when ``blind``) unless
    ``lmbda_scale`` is given; reconstruction uses ``lmbda_scale`` or 1.
    """
    if task not in ("reconstruct", "denoise"):
        raise ValueError(f"task must be 'reconstruct' or 'denoise', got {task!r}")
    if task == "denoise" and not (0 < sigma <= 255 and math.isfinite(sigma)):
        raise ValueError(f"denoising needs 0 < sigma <= 255 (0..255 scale), got {sigma}")
    scores, zeros, total, estimates = [], 0, 0, []
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
        codes = model.encode(inp, scale)
        if model.config.shift_average:
            out = model.reconstruct(inp, scale)
        else:
            out = model.decode(codes, output_size=tuple(x.shape[-2:]))
        scores.append(float(psnr(out, x)[0]))
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
    )


@torch.no_grad()
def refine_calibration(
    model: CSCAutoencoder, images: Sequence[torch.Tensor], seed: int = 0, steps: int = 9, span: float = 2.0
) -> tuple[tuple[float, float], ...]:
    """Line search of ``lmbda_scale`` at every calibration knot (sigma > 0) for the best mean PSNR on
    ``images``: candidates ``scale * span**t`` for ``t`` evenly spaced on [-1, 1]. Returns the new knots
    (``model.config`` is not changed). ``s(0) = 1`` stays: that is the reconstruction setting.
    """
    knots = list(model.config.noise_calibration)
    factors = [span ** (2 * i / (steps - 1) - 1) for i in range(steps)]
    same_size = len({tuple(x.shape) for x in images}) == 1
    clean = [torch.stack(list(images))] if same_size else [x.unsqueeze(0) for x in images]
    for k, (sigma, scale) in enumerate(knots):
        if sigma == 0:
            continue
        noisy = [torch.cat([noisy_copy(x[i : i + 1], sigma, seed, i) for i in range(len(x))]) for x in clean]
        best = (-math.inf, scale)
        for f in factors:
            scores = [psnr(model.reconstruct(n, torch.full((len(n),), scale * f)), x) for n, x in zip(noisy, clean)]
            best = max(best, (float(torch.cat(scores).mean()), scale * f))
        knots[k] = (sigma, best[1])
    return tuple(knots)
