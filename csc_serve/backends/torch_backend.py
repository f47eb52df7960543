"""The torch backend: the model itself, eager or compiled, float32 or bfloat16, on CPU or CUDA."""

from __future__ import annotations

import copy

import numpy as np
import torch

from csc_serve.backends.base import Backend, BackendUnavailable
from csc_serve.models import CSCAutoencoder
from csc_serve.models.autoencoder import zero_map
from csc_serve.models.serialization import weights_sha256

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _frozen(compiled):
    """Compile with inductor's freezing: the weights become constants, so convolutions get prepacked
    weights and fused epilogues (the additions that follow them)."""
    import torch._inductor.config as inductor_config

    def call(*args):
        with inductor_config.patch(freezing=True):
            return compiled(*args)

    return call


class TorchBackend(Backend):
    """Runs ``CSCAutoencoder`` directly. ``compile=True`` wraps each call in ``torch.compile`` (with freezing;
    on CUDA with ``mode="reduce-overhead"``: CUDA graphs); ``precision`` casts the weights (inputs and
    outputs stay float32).
    """

    name = "torch"

    def __init__(
        self,
        model: CSCAutoencoder,
        device: str = "cpu",
        precision: str = "float32",
        compile: bool = False,
        sha256: str | None = None,
    ):
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable("torch has no CUDA device here")
        super().__init__(model.config, sha256 or weights_sha256(model), device)
        self.precision = precision
        self.compiled = compile
        self.dtype = DTYPES[precision]
        model = copy.deepcopy(model).eval()
        model.ensure_step_sizes()  # before casting: L is computed once, in float32
        self.model = model.to(device=device, dtype=self.dtype).requires_grad_(False)
        model = self.model

        def encode(images, lmbda_scale, sigma=None):  # the encode graph's outputs
            stages = model.encode(images, lmbda_scale, all_stages=True, sigma=sigma)
            return (stages[-1], *(zero_map(codes) for codes in stages[:-1]))

        def reconstruct(images, lmbda_scale, sigma=None):
            return model.reconstruct_counting(images, lmbda_scale, sigma=sigma)

        calls = {"encode": encode, "decode": model.decode, "reconstruct": reconstruct}
        if compile:
            mode = "reduce-overhead" if device.startswith("cuda") else None
            calls = {k: _frozen(torch.compile(f, mode=mode, dynamic=False)) for k, f in calls.items()}
        self._calls = calls

    def describe(self) -> dict:
        return {**super().describe(), "precision": self.precision, "compiled": self.compiled}

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(device=self.device, dtype=self.dtype)

    def _run(self, graph: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        # The graphs' inputs in their order: images, lmbda_scale and (noise-adaptive models) sigma; or codes.
        tensors = [self._tensor(inputs[name]) for name in ("images", "lmbda_scale", "sigma", "codes") if name in inputs]
        with torch.inference_mode():
            out = self._calls[graph](*tensors)
        outputs = (out,) if graph == "decode" else out
        return [t.float().cpu().numpy() for t in outputs]
