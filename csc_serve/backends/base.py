"""What every backend shares: input checks, padding to the total stride, ``lmbda_scale`` and ``sigma`` per
sample."""

from __future__ import annotations

import numpy as np

from csc_serve.models import CSCConfig
from csc_serve.models.images import pad_to_stride


class BackendUnavailable(RuntimeError):
    """The runtime a backend needs is not installed, or has no device to run on."""


class Backend:
    """``encode``, ``decode`` and ``reconstruct`` on numpy arrays, one contract for every runtime.

    Images are float32 ``(B, C, H, W)`` in the model's value range, of any size: they are padded (edge
    replication, as ``CSCAutoencoder`` does) to a multiple of the total stride before the graph runs and
    the results are cropped back. ``lmbda_scale`` is ``None`` (1.0), a number, or an array of shape ``(B,)``.
    Codes are the last-stage codes ``(B, K, ceil(H/S), ceil(W/S))``.

    Subclasses implement ``_run(graph, inputs)`` for the graphs ``encode``, ``decode`` and ``reconstruct``
    on stride-aligned inputs: every output of the graph, in the order ``csc_serve.export.graphs`` lists them.
    """

    name = "base"
    # Batches worth running at once: more than one only where a batch leaves cores idle near its end.
    batches_in_flight = 1

    def __init__(self, config: CSCConfig, weights_sha256: str, device: str = "cpu"):
        self.config = config
        self.weights_sha256 = weights_sha256
        self.device = device

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device!r}, weights={self.weights_sha256[:12]})"

    def describe(self) -> dict:
        """What is serving: backend name, device, weights hash (extended by subclasses)."""
        return {"backend": self.name, "device": self.device, "weights_sha256": self.weights_sha256}

    # ----------------------------------------------------------------------------- checks
    def _images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        c = self.config.in_channels
        if images.ndim != 4 or images.shape[1] != c:
            raise ValueError(f"expected images of shape (B, {c}, H, W), got {images.shape}")
        if min(images.shape) == 0:
            raise ValueError(f"images must have at least one pixel and one sample, got {images.shape}")
        if not np.issubdtype(images.dtype, np.floating):
            raise ValueError(f"images must be floats in {list(self.config.value_range)}, got dtype {images.dtype}")
        images = np.ascontiguousarray(images, dtype=np.float32)
        if not np.isfinite(images).all():
            raise ValueError("images hold NaN or Inf")
        return images

    def _codes(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        k = self.config.code_channels
        if codes.ndim != 4 or codes.shape[1] != k:
            raise ValueError(f"expected codes of shape (B, {k}, h, w), got {codes.shape}")
        if min(codes.shape) == 0:
            raise ValueError(f"codes must not be empty, got {codes.shape}")
        if not np.issubdtype(codes.dtype, np.floating):
            raise ValueError(f"codes must be floats, got dtype {codes.dtype}")
        codes = np.ascontiguousarray(codes, dtype=np.float32)
        if not np.isfinite(codes).all():
            raise ValueError("codes hold NaN or Inf")
        return codes

    @staticmethod
    def _scale(lmbda_scale, batch: int) -> np.ndarray:
        """``lmbda_scale`` as float32 of shape ``(batch,)``; finite and non-negative."""
        return _per_sample(lmbda_scale, batch, "lmbda_scale", 1.0, float("inf"))

    def _inputs(self, images: np.ndarray, lmbda_scale, sigma) -> dict[str, np.ndarray]:
        """The feeds of the encode and reconstruct graphs: padded images, ``lmbda_scale`` and, for a model with
        noise-adaptive thresholds, ``sigma`` (0..255, default 0; other models check it and leave it out)."""
        batch = images.shape[0]
        inputs = {"images": self._pad(images), "lmbda_scale": self._scale(lmbda_scale, batch)}
        noise = _per_sample(sigma, batch, "sigma", 0.0, 255.0)
        if self.config.noise_adaptive:
            inputs["sigma"] = noise
        return inputs

    def _pad(self, images: np.ndarray) -> np.ndarray:
        return pad_to_stride(images, self.config.total_stride)

    # ----------------------------------------------------------------------------- the contract
    def encode(self, images: np.ndarray, lmbda_scale=None, sigma=None) -> np.ndarray:
        """Last-stage sparse codes ``(B, K, ceil(H/S), ceil(W/S))`` (float32). ``sigma`` (``None``, a number or
        ``(B,)``, 0..255): the noise level noise-adaptive thresholds follow (``CSCConfig.noise_adaptive``)."""
        return self.encode_counting(images, lmbda_scale, sigma)[0]

    def encode_counting(self, images: np.ndarray, lmbda_scale=None, sigma=None) -> tuple[np.ndarray, list]:
        """``encode``, and for every stage before the last the number of zero codes at each position of its
        code grid, ``(B, h_l, w_l)`` float32: what the encoder computed on the way, from the same pass."""
        outputs = self._run("encode", self._inputs(self._images(images), lmbda_scale, sigma))
        return outputs[0], outputs[1:]

    def encode_each(self, images: np.ndarray, lmbda_scale=None, consume=None, sigma=None) -> list:
        """``encode`` with the codes handed over as they are made: ``consume(first, codes)`` is called on the
        codes of images ``first, first + 1, ...`` (all of them, or a run of them), by the thread that made them
        where the backend splits batches, so work on the codes runs beside the encoding of the rest. Returns
        the ``consume`` results in image order."""
        return self._encode_each(self._inputs(self._images(images), lmbda_scale, sigma), consume)

    def _encode_each(self, inputs: dict[str, np.ndarray], consume) -> list:
        return [consume(0, self._run("encode", inputs)[0])]

    def decode(self, codes: np.ndarray, output_size: tuple[int, int] | None = None) -> np.ndarray:
        """Images ``(B, C, h*S, w*S)`` from last-stage codes, cropped to ``output_size`` if given."""
        out = self._run("decode", {"codes": self._codes(codes)})[0]
        if output_size is not None:
            out = out[..., : output_size[0], : output_size[1]]
        return np.ascontiguousarray(out)

    def reconstruct(self, images: np.ndarray, lmbda_scale=None, sigma=None) -> np.ndarray:
        """``decode(encode(images))`` at the input size (shift-averaged where the model says so); ``sigma`` as
        for ``encode``."""
        return self.reconstruct_counting(images, lmbda_scale, sigma)[0]

    def reconstruct_counting(self, images: np.ndarray, lmbda_scale=None, sigma=None) -> tuple[np.ndarray, np.ndarray]:
        """``reconstruct``, and the zero last-stage codes it was made of at each position of the code grid,
        ``(B, ceil(H/S), ceil(W/S))`` float32, summed over the shifted copies it averages
        (``CSCAutoencoder.reconstruct_counting``): from the same pass."""
        images = self._images(images)
        h, w = images.shape[-2:]
        out, zeros = self._run("reconstruct", self._inputs(images, lmbda_scale, sigma))
        return np.ascontiguousarray(out[..., :h, :w]), zeros

    def _run(self, graph: str, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError


def _per_sample(value, batch: int, name: str, default: float, high: float) -> np.ndarray:
    """A number, ``None`` (``default``) or an array of shape ``(batch,)`` as float32 ``(batch,)``, each value
    finite and in ``[0, high]``."""
    if value is None:
        return np.full(batch, default, np.float32)
    array = np.asarray(value, dtype=np.float32)
    if array.ndim == 0 or array.shape == (1,):
        array = np.full(batch, float(array.reshape(())), np.float32)
    if array.shape != (batch,):
        raise ValueError(f"{name} must be a number or have shape ({batch},), got {array.shape}")
    if not np.isfinite(array).all() or (array < 0).any() or (array > high).any():
        bound = "non-negative" if high == float("inf") else f"in [0, {high:g}]"
        raise ValueError(f"{name} must be finite and {bound}")
    return np.ascontiguousarray(array)
