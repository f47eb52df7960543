"""Image quality: one PSNR for training, evaluation, serving and benchmarks, on numpy arrays or torch tensors."""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# The MSE floor, relative to data_range^2: a perfect estimate scores 120 dB, not inf (which JSON cannot hold).
MSE_FLOOR = 1e-12


def psnr(
    estimate: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    data_range: float = 1.0,
    *,
    clip: bool = False,
    per_image: bool = False,
) -> float | np.ndarray | torch.Tensor:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range^2 / MSE)``, of ``estimate`` against ``target``.

    The convention: the peak is ``data_range`` (images in ``[0, data_range]``); the MSE is the mean of the
    squared errors over every value, floored at ``MSE_FLOOR * data_range^2``; nothing is clipped or rounded
    unless ``clip``, which clips the estimate (never the target) to ``[0, data_range]`` first. ``csc eval``
    (the convention of the published denoising tables: per image, averaged over images) and the service's
    ``X-CSC-PSNR`` clip; the benchmarks do not.

    ``per_image``: one value per image along the first axis (a batch ``(B, ...)``), else one for the whole
    array. Torch tensors give a tensor (computed in their dtype); numpy arrays are computed in float64 and
    give a float, or an array of them with ``per_image``.
    """
    torch = sys.modules.get("torch")  # tensors exist only where torch was imported
    if torch is not None and (isinstance(estimate, torch.Tensor) or isinstance(target, torch.Tensor)):
        estimate, target = torch.as_tensor(estimate), torch.as_tensor(target)
        if clip:
            estimate = estimate.clamp(0, data_range)
        squared = (estimate - target).pow(2)
        mse = squared.flatten(1).mean(1) if per_image else squared.mean()
        result = -10 * torch.log10(mse.clamp_min(MSE_FLOOR * data_range**2))
    else:
        estimate = np.asarray(estimate, dtype=np.float64)
        if clip:
            estimate = np.clip(estimate, 0, data_range)
        error = estimate - np.asarray(target, dtype=np.float64)
        squared = error * error
        mse = squared.reshape(len(squared), -1).mean(1) if per_image else float(np.mean(squared))
        result = -10 * np.log10(np.maximum(mse, MSE_FLOOR * data_range**2))
        result = result if per_image else float(result)
    return result if data_range == 1 else result + 20 * math.log10(data_range)
