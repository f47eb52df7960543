"""The graph signatures: thin modules around the real ``CSCAutoencoder`` calls, one per exported graph.

Inputs are stride-aligned (height and width multiples of the model's total stride); backends pad and crop.
``lmbda_scale`` is a runtime input of shape ``(batch,)``; a model with noise-adaptive thresholds
(``CSCConfig.noise_adaptive``) also takes ``sigma`` ``(batch,)``, the noise level of each image on the 0..255
scale (0: none). The decoder depends on neither and has none. A float16 graph keeps float32 inputs and
outputs and casts at the boundary, so every graph of a model is called the same way.

What a graph reports about its codes comes out of the same pass, so no caller encodes twice to learn it:

- ``encode`` returns the last-stage ``codes`` and, for every earlier stage ``l``, ``stage{l}_zeros``: the
  number of zero codes of that stage at each position of its code grid, ``(batch, h_l, w_l)``.
- ``reconstruct`` returns the ``reconstruction`` and ``zeros``: the zero last-stage codes at each position of
  the image's code grid, summed over the shifted copies it averages (``CSCAutoencoder.reconstruct_counting``).
"""

from __future__ import annotations

import torch
from torch import nn

from csc_serve.models import CSCAutoencoder, CSCConfig
from csc_serve.models.autoencoder import zero_map

from .manifest import GRAPH_NAMES


class EncodeGraph(nn.Module):
    def __init__(self, model: CSCAutoencoder):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, lmbda_scale: torch.Tensor,
                sigma: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        dtype = self.model.input_mean.dtype
        stages = self.model.encode(images.to(dtype), lmbda_scale.to(dtype), all_stages=True,
                                   sigma=None if sigma is None else sigma.to(dtype))
        # (B, K, H/S, W/S), then (B, h_l, w_l) per earlier stage
        return (stages[-1].to(torch.float32), *(zero_map(codes) for codes in stages[:-1]))


class DecodeGraph(nn.Module):
    def __init__(self, model: CSCAutoencoder):
        super().__init__()
        self.model = model

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(codes.to(self.model.input_mean.dtype)).to(torch.float32)  # (B, C, H, W)


class ReconstructGraph(nn.Module):
    def __init__(self, model: CSCAutoencoder):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, lmbda_scale: torch.Tensor,
                sigma: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.model.input_mean.dtype
        out, zeros = self.model.reconstruct_counting(images.to(dtype), lmbda_scale.to(dtype),
                                                     sigma=None if sigma is None else sigma.to(dtype))
        return out.to(torch.float32), zeros  # (B, C, H, W), (B, H/S, W/S)


IMAGES = {"name": "images", "axes": ["batch", "channels", "height", "width"]}
CODES = {"name": "codes", "axes": ["batch", "channels", "code_height", "code_width"]}
SCALE = {"name": "lmbda_scale", "axes": ["batch"]}
SIGMA = {"name": "sigma", "axes": ["batch"]}
RECONSTRUCTION = {"name": "reconstruction", "axes": ["batch", "channels", "height", "width"]}
ZEROS = {"name": "zeros", "axes": ["batch", "code_height", "code_width"]}
MODULES = {"encode": EncodeGraph, "decode": DecodeGraph, "reconstruct": ReconstructGraph}


def stage_zeros_name(stage: int) -> str:
    """The encode graph's output of the zero counts of stage ``stage`` (0-based, before the last)."""
    return f"stage{stage}_zeros"


def graph_signature(config: CSCConfig, graph: str) -> tuple[type[nn.Module], list[dict], list[dict]]:
    """``(module, inputs, outputs)`` of ``graph`` for a model of ``config``; every name and dynamic axis of the
    exported graphs comes from here."""
    if graph not in MODULES:
        raise ValueError(f"unknown graph {graph!r}; choose from {', '.join(GRAPH_NAMES)}")
    images = [IMAGES, SCALE, SIGMA] if config.noise_adaptive else [IMAGES, SCALE]
    if graph == "decode":
        return DecodeGraph, [CODES], [IMAGES]
    if graph == "reconstruct":
        return ReconstructGraph, images, [RECONSTRUCTION, ZEROS]
    stages = [{"name": stage_zeros_name(i), "axes": ["batch", f"stage{i}_height", f"stage{i}_width"]}
              for i in range(len(config.stages) - 1)]
    return EncodeGraph, images, [CODES, *stages]


def io_shapes(model: CSCAutoencoder, specs: list[dict]) -> list[dict]:
    """Manifest form of a graph's inputs or outputs: names, shapes (dynamic axes by name), dtypes."""
    c, k = model.config.in_channels, model.config.code_channels
    channels = {"images": c, "reconstruction": c, "codes": k}
    out = []
    for spec in specs:
        shape = [channels[spec["name"]] if axis == "channels" else axis for axis in spec["axes"]]
        out.append({"name": spec["name"], "shape": shape, "dtype": "float32"})
    return out


def dynamic_axes(specs: list[dict]) -> dict[str, dict[int, str]]:
    return {spec["name"]: {i: axis for i, axis in enumerate(spec["axes"]) if axis != "channels"} for spec in specs}
