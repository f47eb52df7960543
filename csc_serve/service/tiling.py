"""Large images in overlapping tiles, with a result equal to the untiled one.

Every operation of the model is local. Stage ``l`` (kernel ``k_l``, padding ``p_l = (k_l - 1) / 2``, input
grid spacing ``g_l`` image pixels, the product of the earlier strides) moves information by at most
``p_l * g_l`` pixels per convolution; its first FISTA step applies one (``D^T x``), each later step two
(``D^T D y``), and decoding one more per stage. So a code, or an output pixel, depends only on the input
within

    radius = sum_l (2 * num_steps_l - 1) * p_l * g_l  +  sum_l p_l * g_l          (+ S with shift averaging)

pixels (``S`` the total stride). A tile that holds its core region plus ``radius`` pixels of real image on
every side computes that core exactly as the whole image would: the zero boundary at the tile's cut edges
never reaches the core. Tiles start on multiples of ``S`` (the image is first padded to a multiple of ``S``
by edge replication, as every backend does), so the code grid of a tile is a window of the image's grid.
What remains is float rounding: reductions may be ordered differently at another image size
(``TILE_TOLERANCE``). A circular boundary couples opposite edges of the whole image, so such models are
never tiled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from csc_serve.models import CSCConfig

# Max abs difference between tiled and untiled results (images in [0, 1], codes of the same scale):
# float32 reductions reordered by the convolution kernels at a different image size.
TILE_TOLERANCE = 1e-5


def receptive_margin(config: CSCConfig) -> int:
    """Pixels of context each side of a tile core (a multiple of the total stride) for exact tiling."""
    grid, radius = 1, 0
    for stage in config.stages:
        reach = (stage.kernel_size - 1) // 2 * grid  # one convolution, in image pixels
        radius += (2 * stage.num_steps - 1) * reach + reach  # the encoder's steps, then the decoder
        # Per-position thresholds read the codes around each code at every step (StageConfig.neighbourhood).
        radius += stage.num_steps * (stage.neighbourhood // 2) * grid * stage.stride
        grid *= stage.stride
    stride = config.total_stride
    if config.shift_average and stride > 1:
        radius += stride  # every shifted copy sees the image moved by up to S - 1 pixels
    return -(-radius // stride) * stride


def can_tile(config: CSCConfig) -> bool:
    return config.padding_mode == "zeros"


@dataclass(frozen=True)
class Tile:
    """A core region of the (stride-padded) image and the larger source region computed to produce it."""

    core: tuple[int, int, int, int]  # top, left, bottom, right in pixels
    source: tuple[int, int, int, int]

    def source_of(self, image: np.ndarray) -> np.ndarray:
        top, left, bottom, right = self.source
        return image[..., top:bottom, left:right]

    def core_in_source(self, factor: int = 1) -> tuple[slice, slice]:
        """The core inside a result computed on the source region, at ``1 / factor`` resolution."""
        top, left, bottom, right = self.core
        return (slice((top - self.source[0]) // factor, (bottom - self.source[0]) // factor),
                slice((left - self.source[1]) // factor, (right - self.source[1]) // factor))

    def core_in_image(self, factor: int = 1) -> tuple[slice, slice]:
        top, left, bottom, right = self.core
        return slice(top // factor, bottom // factor), slice(left // factor, right // factor)


def plan_tiles(height: int, width: int, tile_size: int, margin: int, stride: int) -> list[Tile]:
    """Tiles covering a ``height`` x ``width`` image (both multiples of ``stride``), row by row."""
    if height % stride or width % stride:
        raise ValueError(f"pad the image to a multiple of the stride {stride} first, got {height}x{width}")
    size = max(stride, tile_size // stride * stride)
    tiles = []
    for top in range(0, height, size):
        for left in range(0, width, size):
            bottom, right = min(top + size, height), min(left + size, width)
            source = (max(0, top - margin), max(0, left - margin),
                      min(height, bottom + margin), min(width, right + margin))
            tiles.append(Tile((top, left, bottom, right), source))
    return tiles
