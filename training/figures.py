"""Pictures of a model: the atoms of every stage as seen in pixel space."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from csc_serve.models import CSCAutoencoder
from csc_serve.models.explain import pixel_atoms, tile_atoms
from csc_serve.models.serialization import atomic_write


@torch.no_grad()
def effective_atoms(model: CSCAutoencoder, stage: int) -> torch.Tensor:
    """Atom ``k`` of stage ``l`` in pixel space: ``D_1 ... D_l e_k``, shape ``(K_l, C, h, w)``; the atoms the
    service's ``/atoms`` returns (``csc_serve.models.explain.pixel_atoms``)."""
    return pixel_atoms(model, stage)


def atom_image(atoms: torch.Tensor, scale: int = 4, gap: int = 1) -> Image.Image:
    """Tile atoms ``(K, C, h, w)`` into one image, each atom stretched to the full grey/colour range: the grid
    of ``/atoms`` (``csc_serve.models.explain.tile_atoms``) with a ``gap`` border, enlarged ``scale`` times."""
    pixels, _ = tile_atoms(atoms.detach().cpu().numpy(), gap)
    border = ((gap, gap), (gap, gap)) + ((0, 0),) * (pixels.ndim - 2)
    img = Image.fromarray(np.pad(pixels, border, constant_values=255))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def save_atom_figures(model: CSCAutoencoder, out_dir: str | os.PathLike, scale: int = 4) -> list[Path]:
    """Write ``atoms_stage<l>.png`` for every stage; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for stage in range(len(model.stages)):
        atoms = effective_atoms(model, stage).float()  # neither grey nor colour: the grid shows the channel mean
        path = out_dir / f"atoms_stage{stage + 1}.png"
        grid = atom_image(atoms, scale=scale)
        atomic_write(path, lambda tmp, grid=grid: grid.save(tmp, format="PNG"))
        paths.append(path)
    return paths


def _to_pil(x: torch.Tensor) -> Image.Image:
    pixels = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


@torch.no_grad()
def reconstruction_grid(
    model: CSCAutoencoder, images: list[torch.Tensor], sigma: float = 25.0, seed: int = 0
) -> Image.Image:
    """Rows of ``clean | reconstructed | noisy (sigma) | denoised`` for each image (equal sizes)."""
    from .evaluate import noisy_copy

    rows = []
    for i, clean in enumerate(images):
        x = clean.unsqueeze(0)
        noisy = noisy_copy(x, sigma, seed, i)
        denoised = model.denoise(noisy, sigma) if model.config.noise_calibration else model.reconstruct(noisy)
        rows.append(torch.cat([x, model.reconstruct(x), noisy, denoised], dim=-1)[0])
    return _to_pil(torch.cat(rows, dim=-2))


def training_curves(history: list[dict], path: str | os.PathLike) -> None:
    """Plot every logged metric against the step, one panel each, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for record in history for k in record} - {"step", "seconds"})
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(4 * cols, 2.6 * math.ceil(len(keys) / cols)))
    steps = [r["step"] for r in history]
    for ax, key in zip(np.atleast_1d(axes).flat, keys):
        ax.plot(steps, [r.get(key, np.nan) for r in history], marker=".")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(np.atleast_1d(axes).flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def save_training_figures(
    model: CSCAutoencoder, holdout: list[torch.Tensor], history: list[dict], out_dir: str | os.PathLike
) -> list[Path]:
    """Atoms of every stage, a reconstruction grid of held-out images and the training curves."""
    out_dir = Path(out_dir)
    paths = save_atom_figures(model, out_dir)
    if holdout:
        grid = reconstruction_grid(model.eval(), holdout[:4])
        atomic_write(out_dir / "reconstructions.png", lambda tmp: grid.save(tmp, format="PNG"))
        paths.append(out_dir / "reconstructions.png")
    if history:
        training_curves(history, out_dir / "curves.png")
        paths.append(out_dir / "curves.png")
    return paths
