"""What every backend shares: input checks, padding to the total stride, ``lmbda_scale`` per sample."""

from __future__ import annotations

import numpy as np

from csc_serve.models import CSCConfig


class BackendUnavailable(RuntimeError):
    """The runtime a backend needs is not installed, or has no device to run on."""


class Backend:
    """``encode``, ``decode`` and ``reconstruct`` on numpy arrays, one contract for every runtime.

    Images are float32 ``(B, C, H, W)`` in the model's value range, of any size: they are padded (edge
    replication, as ``CSCAutoencoder`` does) to a multiple of the total stride before the graph runs and
    the results are cropped back. ``lmbda_scale`` is ``None`` (1.0), a number, or an array of shape ``(B,)``.
    Codes are the last-stage codes ``(B, K, ceil(H/S), ceil(W/S))``.

    Subclasses implement ``_run(graph, inputs)`` for the graphs ``encode``, ``decode`` and ``reconstruct``
    on stride-aligned inputs.
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
        if lmbda_scale is None:
            return np.ones(batch, np.float32)
        scale = np.asarray(lmbda_scale, dtype=np.float32)
        if scale.ndim == 0 or scale.shape == (1,):
            scale = np.full(batch, float(scale.reshape(())), np.float32)
        if scale.shape != (batch,):
            raise ValueError(f"lmbda_scale must be a number or have shape ({batch},), got {scale.shape}")
        if not np.isfinite(scale).all() or (scale < 0).any():
            raise ValueError("lmbda_scale must be finite and non-negative")
        return np.ascontiguousarray(scale)

    def _pad(self, images: np.ndarray) -> np.ndarray:
        s = self.config.total_stride
        h, w = images.shape[-2:]
        pad_h, pad_w = (-h) % s, (-w) % s
        if pad_h or pad_w:
            images = np.pad(images, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)), mode="edge")
        return images

    # ----------------------------------------------------------------------------- the contract
    def encode(self, images: np.ndarray, lmbda_scale=None) -> np.ndarray:
        """Last-stage sparse codes ``(B, K, ceil(H/S), ceil(W/S))`` (float32)."""
        images = self._images(images)
        scale = self._scale(lmbda_scale, images.shape[0])
        return self._run("encode", {"images": self._pad(images), "lmbda_scale": scale})

    def encode_each(self, images: np.ndarray, lmbda_scale=None, consume=None) -> list:
        """``encode`` with the codes handed over as they are made: ``consume(first, codes)`` is called on the
        codes of images ``first, first + 1, ...`` (all of them, or a run of them), by the thread that made them
        where the backend splits batches, so work on the codes runs beside the encoding of the rest. Returns
        the ``consume`` results in image order."""
        images = self._images(images)
        scale = self._scale(lmbda_scale, images.shape[0])
        return self._encode_each({"images": self._pad(images), "lmbda_scale": scale}, consume)

    def _encode_each(self, inputs: dict[str, np.ndarray], consume) -> list:
        return [consume(0, self._run("encode", inputs))]

    def decode(self, codes: np.ndarray, output_size: tuple[int, int] | None = None) -> np.ndarray:
        """Images ``(B, C, h*S, w*S)`` from last-stage codes, cropped to ``output_size`` if given."""
        out = self._run("decode", {"codes": self._codes(codes)})
        if output_size is not None:
            out = out[..., : output_size[0], : output_size[1]]
        return np.ascontiguousarray(out)

    def reconstruct(self, images: np.ndarray, lmbda_scale=None) -> np.ndarray:
        """``decode(encode(images))`` at the input size (shift-averaged where the model says so)."""
        images = self._images(images)
        h, w = images.shape[-2:]
        scale = self._scale(lmbda_scale, images.shape[0])
        out = self._run("reconstruct", {"images": self._pad(images), "lmbda_scale": scale})
        return np.ascontiguousarray(out[..., :h, :w])

    def reconstruct_inspecting(self, images: np.ndarray, lmbda_scale=None, inspect=None) -> tuple[np.ndarray, list]:
        """``decode(encode(images))`` with a look at the codes on the way: ``inspect(first, codes)`` is called on
        the codes of images ``first, first + 1, ...`` (all of them, or a run of them) before they are decoded.
        Returns the images at the input size and the ``inspect`` results in image order. Unlike ``reconstruct``
        it never shift-averages."""
        images = self._images(images)
        h, w = images.shape[-2:]
        scale = self._scale(lmbda_scale, images.shape[0])
        out, seen = self._encode_decode({"images": self._pad(images), "lmbda_scale": scale}, inspect)
        return np.ascontiguousarray(out[..., :h, :w]), seen

    def _encode_decode(self, inputs: dict[str, np.ndarray], inspect) -> tuple[np.ndarray, list]:
        codes = self._run("encode", inputs)
        seen = [inspect(0, codes)] if inspect is not None else []
        return self._run("decode", {"codes": codes}), seen

    def _run(self, graph: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError
