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
        level = None  # the noise level noise-affine thresholds read: none for reconstruction
        if task == "denoise":
            if blind:
                level = estimate_noise_sigma(inp)
                estimates.append(float(level[0]))
            else:
                level = torch.tensor([sigma])
        if lmbda_scale is not None:
            scale = torch.tensor([float(lmbda_scale)])
        elif task == "denoise":
            scale = model.lmbda_scale_for_sigma(level)
        else:
            scale = torch.ones(1)
        start = time.perf_counter()
        codes = model.encode(inp, scale, sigma=level)
        if model.config.shift_average:
            start = time.perf_counter()  # what is served is the shift average, whose codes are its own
            out = model.reconstruct(inp, scale, sigma=level)
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
