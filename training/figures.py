"""Pictures of a model: the atoms of every stage as seen in pixel space."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models import CSCAutoencoder
from models.serialization import atomic_write


@torch.no_grad()
def effective_atoms(model: CSCAutoencoder, stage: int) -> torch.Tensor:
    """Atom ``k`` of stage ``l`` in pixel space: ``D_1 ... D_l e_k``, shape ``(K_l, C, h, w)``.

    For the first stage these are the dictionary filters themselves; deeper atoms are their synthesis
    through the earlier dictionaries, which is what a unit code at that stage adds to the image.
    """
    layers = model.stages[: stage + 1]
    # Receptive field in pixels: R_l = R_{l-1} + (k_l - 1) * S_{l-1}, with S the stride product so far.
    span, stride = 1, 1
    for layer in layers:
        span += (layer.kernel_size - 1) * stride
        stride *= layer.stride
    half = span // 2
    centre = -(-half // stride)  # code position whose atom lies wholly inside the image
    num_atoms = layers[-1].num_atoms
    codes = torch.zeros(num_atoms, num_atoms, 2 * centre + 1, 2 * centre + 1, dtype=layers[-1].dictionary.dtype)
    codes[torch.arange(num_atoms), torch.arange(num_atoms), centre, centre] = 1.0
    x = codes
    for layer in reversed(layers):
        x = layer.decode(x)
    c = centre * stride  # a code at position m is centred on pixel m * stride
    return x[..., c - half : c + half + 1, c - half : c + half + 1]


def atom_grid(atoms: torch.Tensor, scale: int = 4, gap: int = 1) -> Image.Image:
    """Tile atoms ``(K, C, h, w)`` into one image, each atom stretched to the full grey/colour range."""
    k, c, h, w = atoms.shape
    flat = atoms.flatten(1)
    low, high = flat.min(1).values.view(k, 1, 1, 1), flat.max(1).values.view(k, 1, 1, 1)
    atoms = (atoms - low) / (high - low).clamp_min(1e-12)
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    canvas = np.ones((rows * (h + gap) + gap, cols * (w + gap) + gap, c), dtype=np.float32)
    for i in range(k):
        r, q = divmod(i, cols)
        y, x = gap + r * (h + gap), gap + q * (w + gap)
        canvas[y : y + h, x : x + w] = atoms[i].permute(1, 2, 0).cpu().numpy()
    pixels = (canvas * 255).round().astype(np.uint8)
    img = Image.fromarray(pixels[..., 0] if c == 1 else pixels[..., :3])
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def save_atom_figures(model: CSCAutoencoder, out_dir: str | os.PathLike, scale: int = 4) -> list[Path]:
    """Write ``atoms_stage<l>.png`` for every stage; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for stage in range(len(model.stages)):
        atoms = effective_atoms(model, stage).float()
        if atoms.shape[1] not in (1, 3):  # colour images need three channels; show the mean otherwise
            atoms = atoms.mean(1, keepdim=True)
        path = out_dir / f"atoms_stage{stage + 1}.png"
        grid = atom_grid(atoms, scale=scale)
        atomic_write(path, lambda tmp, grid=grid: grid.save(tmp, format="PNG"))
        paths.append(path)
    return paths
