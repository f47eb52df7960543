"""The graph signatures: thin modules around the real ``CSCAutoencoder`` calls, one per exported graph.

Inputs are stride-aligned (height and width multiples of the model's total stride); backends pad and crop.
``lmbda_scale`` is a runtime input of shape ``(batch,)``; the decoder does not depend on it and has none.
A float16 graph keeps float32 inputs and outputs and casts at the boundary, so every graph of a model is
called the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from csc_serve.models import CSCAutoencoder


class EncodeGraph(nn.Module):
    def __init__(self, model: CSCAutoencoder):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, lmbda_scale: torch.Tensor) -> torch.Tensor:
        dtype = self.model.input_mean.dtype
        codes = self.model.encode(images.to(dtype), lmbda_scale.to(dtype))  # (B, K, H/S, W/S)
        return codes.to(torch.float32)


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

    def forward(self, images: torch.Tensor, lmbda_scale: torch.Tensor) -> torch.Tensor:
        dtype = self.model.input_mean.dtype
        return self.model.reconstruct(images.to(dtype), lmbda_scale.to(dtype)).to(torch.float32)


IMAGES = {"name": "images", "axes": ["batch", "channels", "height", "width"]}
CODES = {"name": "codes", "axes": ["batch", "channels", "code_height", "code_width"]}
SCALE = {"name": "lmbda_scale", "axes": ["batch"]}
RECONSTRUCTION = {"name": "reconstruction", "axes": ["batch", "channels", "height", "width"]}

# graph name -> (module, inputs, outputs); every name and dynamic axis of the exported graphs comes from here.
GRAPHS: dict[str, tuple[type[nn.Module], list[dict], list[dict]]] = {
    "encode": (EncodeGraph, [IMAGES, SCALE], [CODES]),
    "decode": (DecodeGraph, [CODES], [IMAGES]),
    "reconstruct": (ReconstructGraph, [IMAGES, SCALE], [RECONSTRUCTION]),
}


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
