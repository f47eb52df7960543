r"""What each atom does: the dictionaries' atoms in pixel space, and a reconstruction split atom by atom.

The decoder is linear in the last-stage codes. With ``m`` the input mean and ``z = sum_k e_k z_k`` the codes
split by atom (``e_k z_k``: atom ``k``'s code map, every other map zero),

    g(z) = m + D_1 D_2 ... D_L z = m + sum_k c_k,        c_k = D_1 D_2 ... D_L (e_k z_k),

so ``base`` (``m`` as an image, what all-zero codes decode to) plus the contributions ``c_k`` of all ``K``
atoms is the reconstruction, exactly up to float rounding. A shift-averaged model (``config.shift_average``)
reconstructs ``(1/T) sum_t U_t g(z_t)``, with ``z_t`` the codes of the image shifted by ``t`` in
``config.shifts`` and ``U_t`` the shift back and crop (``CSCAutoencoder.reconstruct``); the contribution of
atom ``k`` is then the mean over the same shifts, ``c_k = (1/T) sum_t U_t D_1 ... D_L (e_k z_{t,k})``, and the
identity holds as well. ``explain`` computes ``c_k`` for the atoms asked for, through the model's own
synthesis operators; ``pixel_atoms`` draws atoms as ``csc viz`` does.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from .autoencoder import SHIFT_PASS_PIXELS, CSCAutoencoder, shifted_copies, sum_of_unshifted

_ITEM = re.compile(r"([0-9]{1,18})(?:\s*-\s*([0-9]{1,18}))?")


def parse_atoms(text: str, num_atoms: int, limit: int | None = None) -> np.ndarray:
    """Atom indices from a list such as ``"3,17,40-43"``: comma-separated indices and inclusive ranges, spaces
    allowed, as sorted unique int64. ``ValueError`` (one line) for a malformed item, a range that runs
    backwards, an index outside ``[0, num_atoms)``, or more than ``limit`` atoms."""
    chosen: set[int] = set()
    for item in text.split(","):
        match = _ITEM.fullmatch(item.strip())
        if match is None:
            shown = item.strip()[:40] or "an empty item"
            raise ValueError(f"{shown!r} is not an atom index or a range such as 40-43")
        first = int(match[1])
        last = first if match[2] is None else int(match[2])
        if first > last:
            raise ValueError(f"the range {first}-{last} runs backwards")
        if last >= num_atoms:
            raise ValueError(f"atom {last} is out of range: the model has {num_atoms} atoms, 0 to {num_atoms - 1}")
        chosen.update(range(first, last + 1))  # at most num_atoms: the bounds are checked first
        if limit is not None and len(chosen) > limit:
            raise ValueError(f"more than {limit} atoms (at most {limit} may be listed)")
    return np.array(sorted(chosen), np.int64)


def atom_mask(atoms: np.ndarray, num_atoms: int, keep: bool = True) -> np.ndarray:
    """A float32 ``(K,)`` mask: 1 for ``atoms`` and 0 elsewhere (``keep``), or the reverse (drop them)."""
    mask = np.zeros(num_atoms, np.float32) if keep else np.ones(num_atoms, np.float32)
    mask[atoms] = 1.0 if keep else 0.0
    return mask


@torch.no_grad()
def pixel_atoms(model: CSCAutoencoder, stage: int) -> torch.Tensor:
    """Atom ``k`` of stage ``l`` in pixel space, ``D_1 ... D_l e_k``: ``(K_l, C, h, w)``, the input mean left out.

    For the first stage these are the dictionary filters themselves; deeper atoms are their synthesis through
    the earlier dictionaries: what a unit code of that stage, away from the borders, adds to the image.
    """
    layers = model.stages[: stage + 1]
    # Receptive field in pixels: R_l = R_{l-1} + (k_l - 1) * S_{l-1}, with S the stride product so far.
    span, stride = 1, 1
    for layer in layers:
        span += (layer.kernel_size - 1) * stride
        stride *= layer.stride
    half = span // 2
    centre = -(-half // stride)  # the code position whose atom lies wholly inside the image
    num_atoms = layers[-1].num_atoms
    codes = torch.zeros(num_atoms, num_atoms, 2 * centre + 1, 2 * centre + 1, dtype=layers[-1].dictionary.dtype)
    codes[torch.arange(num_atoms), torch.arange(num_atoms), centre, centre] = 1.0
    x = codes
    for layer in reversed(layers):
        x = layer.decode(x)
    c = centre * stride  # a code at position m is centred on pixel m * stride
    return x[..., c - half : c + half + 1, c - half : c + half + 1]


def tile_atoms(atoms: np.ndarray, gap: int = 1) -> tuple[np.ndarray, tuple[int, int]]:
    """Atoms ``(K, C, h, w)`` tiled row-major in index order into ``rows x cols`` cells (``cols =
    ceil(sqrt(K))``), separated by ``gap`` white pixels (none around the edge), each atom stretched on its own to
    the full 0..255 range: uint8 pixels ``(rows*h + (rows-1)*gap, cols*w + (cols-1)*gap)`` for one channel, with
    a trailing axis of 3 for colour, and ``(rows, cols)``. Atoms of other channel counts show their mean."""
    k, c, h, w = atoms.shape
    if c not in (1, 3):
        atoms, c = atoms.mean(1, keepdims=True), 1
    flat = atoms.reshape(k, -1).astype(np.float64)
    low, high = flat.min(1), flat.max(1)
    stretched = (flat - low[:, None]) / np.maximum(high - low, 1e-12)[:, None]
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    canvas = np.ones((rows * (h + gap) - gap, cols * (w + gap) - gap, c))
    for i, atom in enumerate(stretched.reshape(k, c, h, w)):
        r, q = divmod(i, cols)
        canvas[r * (h + gap) : r * (h + gap) + h, q * (w + gap) : q * (w + gap) + w] = atom.transpose(1, 2, 0)
    pixels = np.rint(canvas * 255).astype(np.uint8)
    return (pixels[..., 0] if c == 1 else pixels), (rows, cols)


@dataclass(frozen=True)
class Explanation:
    """An image's last-stage codes and its reconstruction split by atom (all float32 numpy arrays)."""

    codes: np.ndarray  # (K, h, w): the codes of the unshifted image, as encode returns them
    atoms: np.ndarray  # (n,) int64: the atoms whose contributions were computed
    contributions: np.ndarray  # (n, C, H, W)
    base: np.ndarray  # (C, H, W): the input mean, what all-zero codes decode to
    reconstruction: np.ndarray  # (C, H, W): base + the contributions of all K atoms

    @property
    def energy(self) -> np.ndarray:
        """Sum of |code| of each atom over the image, float64 ``(K,)``."""
        return atom_energy(self.codes)


def atom_energy(codes: np.ndarray) -> np.ndarray:
    """Sum of |code| of each atom of ``(K, h, w)`` codes, float64 ``(K,)``."""
    return np.abs(codes).sum(axis=(1, 2), dtype=np.float64)


@torch.no_grad()
def explain(model: CSCAutoencoder, image: np.ndarray | torch.Tensor, atoms: np.ndarray | list[int] | None,
            lmbda_scale: float = 1.0, strongest: int = 0, sigma: float | None = None) -> Explanation:
    """The codes of ``image`` ``(C, H, W)``, its reconstruction at ``lmbda_scale`` (as ``model.reconstruct``:
    shift-averaged where the model says so), and the contributions of ``atoms`` (last-stage indices) to it;
    ``atoms=None``: of the ``strongest`` atoms by energy (ties to the lower index), in index order."""
    x = torch.as_tensor(np.array(image, np.float32))[None]  # (1, C, H, W), a copy: the input may be read-only
    size = tuple(x.shape[-2:])
    s = model.config.total_stride
    averaged = model.config.shift_average and s > 1
    codes = model.encode(x, lmbda_scale, sigma=sigma)  # (1, K, h, w)
    if atoms is None:
        atoms = np.sort(np.argsort(-atom_energy(codes[0].numpy()), kind="stable")[:strongest])
    atoms = np.asarray(atoms, np.int64).reshape(-1)
    if averaged:
        shifts = model.config.shifts
        group = max(1, SHIFT_PASS_PIXELS // ((size[0] + s) * (size[1] + s)))
        passes = [shifts[i : i + group] for i in range(0, len(shifts), group)]
    else:
        shifts = [(0, 0)]
        passes = [shifts]
    mean = model.input_mean.to(x.dtype)
    reconstruction = torch.zeros_like(x)
    contributions = torch.zeros(len(atoms), *x.shape[1:], dtype=x.dtype)  # (n, C, H, W)
    for part in passes:
        z = model.encode(shifted_copies(x, part, s), lmbda_scale, sigma=sigma) if averaged else codes  # (T', K, h', w')
        reconstruction += sum_of_unshifted(model.decode(z), part, size)
        for i, atom in enumerate(atoms):
            contributions[i] += sum_of_unshifted(atom_synthesis(model, z, int(atom)), part, size)[0]
    base = mean[0].expand(*x.shape[1:])
    return Explanation(
        codes=codes[0].numpy(),
        atoms=atoms,
        contributions=(contributions / len(shifts)).numpy(),
        base=base.contiguous().numpy(),
        reconstruction=(reconstruction / len(shifts))[0].numpy(),
    )


def atom_synthesis(model: CSCAutoencoder, codes: torch.Tensor, atom: int) -> torch.Tensor:
    """``D_1 ... D_L (e_k z_k)``: the image of last-stage atom ``k``'s codes alone, ``(B, K, h, w) -> (B, C,
    h*S, w*S)``, without the input mean. The last stage synthesises the one code map with the one atom."""
    last = model.stages[-1]
    x = last.synthesize(codes[:, atom : atom + 1], last.dictionary[atom : atom + 1])
    for stage in reversed(model.stages[:-1]):
        x = stage.decode(x)
    return x


__all__ = ["Explanation", "atom_energy", "atom_mask", "atom_synthesis", "explain", "parse_atoms", "pixel_atoms",
           "tile_atoms"]
