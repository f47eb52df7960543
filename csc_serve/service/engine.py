"""The serving engine: one model, its backend and the batcher, behind per-image coroutines.

``Engine`` answers ``encode``, ``decode``, ``reconstruct`` and ``denoise`` for one float32 ``(C, H, W)``
image (or ``(K, h, w)`` codes) per call. Calls are coroutines: any number of them, from any event loop,
wait on the batcher without holding a thread, and meet there in batches (``csc_serve.service.batches``).
Images larger than ``tile_size^2`` pixels become overlapping tiles (``csc_serve.service.tiling``) batched like any
other image. The engine knows nothing of HTTP; ``csc_serve.service.api`` decodes requests into these calls. Bad
input raises ``RequestError``. From synchronous code: ``asyncio.run(engine.reconstruct(image))``.

Loading happens in a background thread (``start``): exporting graphs on first use and warming every call
up takes a while, and the server should answer ``/readyz`` (false) meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass

import numpy as np

from csc_serve.model_store import resolve_source
from csc_serve.models.metrics import psnr
from csc_serve.service.batches import Work, run_batch
from csc_serve.service.batching import Batcher, QueueFull
from csc_serve.service.payloads import RequestError
from csc_serve.service.settings import ServeSettings
from csc_serve.service.tiling import can_tile, pad_to_stride, plan_tiles, receptive_margin

logger = logging.getLogger("csc_serve")

WARMUP_SIZE = 64


@dataclass(frozen=True)
class EncodeResult:
    codes: np.ndarray  # (K, ceil(H/S), ceil(W/S)) float32
    image_size: tuple[int, int]
    sparsity: list[float]  # fraction of zero codes per stage (the last stage only unless asked for all)
    lmbda_scale: float


@dataclass(frozen=True)
class ImageResult:
    image: np.ndarray  # (C, H, W) float32, not clipped
    lmbda_scale: float
    sparsity: float | None = None  # fraction of zero last-stage codes (reconstruct)
    psnr: float | None = None  # dB, of the reconstruction (clipped to [0, 1]) against the input
    sigma: float | None = None  # the noise level denoised for (0..255)
    sigma_source: str | None = None  # "given", "estimated", or None when lmbda_scale was given


class Engine:
    def __init__(self, settings: ServeSettings):
        from csc_serve.models.serialization import read_config

        self.settings = settings
        self.source = resolve_source(settings.model, settings.artifacts)  # fails fast on a bad reference
        self.config, document = read_config(self.source.directory)
        self.weights_sha256 = document["weights_sha256"]
        self.stride = self.config.total_stride
        self.margin = receptive_margin(self.config)
        self.model = self.backend = self.batcher = None
        self.error: str | None = None
        self._ready = threading.Event()

    # ----------------------------------------------------------------------------- lifecycle
    def start(self, background: bool = True) -> Engine:
        if not background:
            self._load()
            if self.error:
                raise RuntimeError(self.error)
            return self
        threading.Thread(target=self._load, name="csc-loader", daemon=True).start()
        return self

    def _load(self) -> None:
        from csc_serve.backends import load_backend
        from csc_serve.models import load_pretrained
        from csc_serve.service.metrics import observe_batch

        try:
            self.model = load_pretrained(self.source.directory)
            self.backend = load_backend(self.model, self.settings.backend, artifacts=self.source.artifacts)
            if self.backend.name != "torch":
                import torch

                # PyTorch only estimates noise and counts early-stage codes here: on one thread it never
                # competes with the backend's threads for the cores.
                torch.set_num_threads(1)
            s = self.settings
            self.batcher = Batcher(self._run_batch, s.max_batch_size, s.max_batch_pixels, s.batch_wait_ms / 1000,
                                   s.max_queue, observe=observe_batch, workers=self.backend.batches_in_flight)
            self._warm_up()
        except Exception as err:  # reported by /readyz, /livez and every request
            self.error = f"{type(err).__name__}: {' '.join(str(err).split())}"
            logger.error("loading %s failed: %s", self.settings.model, self.error)
            return
        logger.info("serving %s on %s", self.settings.model, self.backend.describe())
        self._ready.set()

    def _run_batch(self, key: tuple, items: list[Work]) -> list:
        return run_batch(self.model, self.backend, key, items)

    def _warm_up(self) -> None:
        """Every operation once, at batch 1 and 2, so the first requests meet initialised sessions."""
        shape = (self.config.in_channels, WARMUP_SIZE, WARMUP_SIZE)
        image = (0.5 + 0.1 * np.random.default_rng(0).standard_normal(shape)).astype(np.float32)
        for count in (1, 2):
            for op in ("reconstruct", "denoise", "stages" if len(self.config.stages) > 1 else "encode"):
                self._run_batch((op, *image.shape[1:]), [Work(image)] * count)
            codes = self._run_batch(("encode", *image.shape[1:]), [Work(image)] * count)[0]
            self._run_batch(("decode", *codes.shape), [Work(codes)] * count)
        self.estimate_sigma(image)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()

    def _require_ready(self) -> None:
        if self.error:
            raise RequestError(f"the model failed to load ({self.error})", status=503)
        if not self.ready:
            raise RequestError("the model is still loading; poll /readyz", status=503)

    # ----------------------------------------------------------------------------- the calls
    async def encode(self, image: np.ndarray, lmbda_scale: float = 1.0, stage_sparsity: bool = True) -> EncodeResult:
        """Last-stage codes of one image, with the sparsity of every stage (``stage_sparsity``) or the last."""
        self._require_ready()
        scale = self.check_scale(lmbda_scale)
        h, w = (-(-n // self.stride) for n in image.shape[1:])
        count = self.config.code_channels * h * w
        if count > self.settings.max_code_values:
            raise RequestError(f"image: its codes would hold {count} values, beyond the cap of "
                               f"{self.settings.max_code_values}", status=413)
        codes = np.empty((self.config.code_channels, h, w), np.float32)
        async for tile, result in self._tiles_or_whole("encode", image, scale):
            if tile is None:
                codes[...] = result
            else:
                codes[(slice(None), *tile.core_in_image(self.stride))] = \
                    result[(slice(None), *tile.core_in_source(self.stride))]
        sparsity = [1.0 - np.count_nonzero(codes) / codes.size]
        if stage_sparsity and len(self.config.stages) > 1:
            counts = np.zeros((len(self.config.stages) - 1, 2), np.int64)
            async for _, result in self._tiles_or_whole("stages", image, scale):
                counts += np.asarray(result, np.int64)
            sparsity = [float(zeros / total) for zeros, total in counts] + sparsity
        _count("encode")
        return EncodeResult(codes, tuple(image.shape[1:]), sparsity, scale)

    async def decode(self, codes: np.ndarray, output_size: tuple[int, int] | None = None) -> np.ndarray:
        """The image ``(C, H, W)`` of ``(K, h, w)`` codes; ``output_size`` crops it (``H <= h * S``)."""
        self._require_ready()
        _, h, w = codes.shape
        s = self.stride
        height, width = output_size or (h * s, w * s)
        if not (0 < height <= h * s and 0 < width <= w * s and -(-height // s) == h and -(-width // s) == w):
            raise RequestError(f"codes of {h}x{w} describe images of up to {h * s}x{w * s} pixels "
                               f"(stride {s}), not {height}x{width}")
        if height * width > self.settings.max_pixels:
            raise RequestError(f"codes: the image would have {height * width} pixels, beyond the cap of "
                               f"{self.settings.max_pixels}", status=413)
        key = ("decode", *codes.shape, height, width)
        image = await self._submit(key, Work(codes, output_size=(height, width)), height * width)
        _count("decode")
        return image

    async def reconstruct(self, image: np.ndarray, lmbda_scale: float = 1.0) -> ImageResult:
        """``decode(encode(image))`` (shift-averaged where the model says so), its PSNR and code sparsity."""
        self._require_ready()
        scale = self.check_scale(lmbda_scale)
        out, sparsity = await self._image_call("reconstruct", image, scale)
        _count("reconstruct")
        return ImageResult(out, scale, sparsity, psnr=psnr(out, image, clip=True))

    async def denoise(self, image: np.ndarray, sigma: float | None = None,
                      lmbda_scale: float | None = None) -> ImageResult:
        """Reconstruct at the scale calibrated for ``sigma`` (0..255), estimated from the image when neither
        ``sigma`` nor ``lmbda_scale`` is given; or at ``lmbda_scale`` itself."""
        self._require_ready()
        if sigma is not None and lmbda_scale is not None:
            raise RequestError("give sigma or lmbda_scale, not both")
        source = None
        if lmbda_scale is None:
            if sigma is None:
                sigma, source = await asyncio.to_thread(self.estimate_sigma, image), "estimated"
            else:
                sigma, source = self.check_sigma(sigma), "given"
            lmbda_scale = self.scale_for_sigma(sigma)
        scale = self.check_scale(lmbda_scale)
        out, _ = await self._image_call("denoise", image, scale)
        _count("denoise")
        return ImageResult(out, scale, sigma=sigma, sigma_source=source)

    # ----------------------------------------------------------------------------- checks
    def check_scale(self, value: float) -> float:
        value = float(value)
        if not 0 <= value <= self.settings.max_lmbda_scale:
            raise RequestError(f"lmbda_scale must lie in [0, {self.settings.max_lmbda_scale:g}], got {value:g}")
        return value

    @staticmethod
    def check_sigma(value: float) -> float:
        value = float(value)
        if not 0 <= value <= 255:
            raise RequestError(f"sigma must lie in [0, 255] (the 8-bit scale), got {value:g}")
        return value

    def scale_for_sigma(self, sigma: float) -> float:
        if self.config.noise_calibration is None:
            raise RequestError("this model has no noise calibration: pass lmbda_scale instead of sigma")
        scale = float(self.model.lmbda_scale_for_sigma(sigma)[0])
        if scale > self.settings.max_lmbda_scale:
            raise RequestError(f"sigma {sigma:g} calls for lmbda_scale {scale:.3g}, beyond the cap of "
                               f"{self.settings.max_lmbda_scale:g}")
        return scale

    @staticmethod
    def estimate_sigma(image: np.ndarray) -> float:
        import torch

        from csc_serve.models import estimate_noise_sigma

        try:
            return float(estimate_noise_sigma(torch.from_numpy(image))[0])
        except ValueError as err:
            raise RequestError(f"cannot estimate the noise level ({err}); pass sigma or lmbda_scale") from None

    # ----------------------------------------------------------------------------- batches and tiles
    async def _image_call(self, op: str, image: np.ndarray, scale: float) -> tuple[np.ndarray, float | None]:
        """``reconstruct`` (with the sparsity of the codes) or ``denoise`` (the fused graph, no codes)."""
        out = np.empty_like(image)
        zeros = total = 0
        async for tile, result in self._tiles_or_whole(op, image, scale):
            result, (tile_zeros, tile_total) = result if op == "reconstruct" else (result, (0, 0))
            if tile is None:
                out[...] = result
            else:
                inside = out[(slice(None), *tile.core_in_image())]  # the stride padding stays outside
                inside[...] = result[(slice(None), *tile.core_in_source())][..., : inside.shape[1], : inside.shape[2]]
            zeros, total = zeros + tile_zeros, total + tile_total
        return out, (zeros / total if total else None)

    async def _tiles_or_whole(self, op: str, image: np.ndarray, scale: float):
        """``(tile, result)`` for each tile of a large image, or ``(None, result)`` for a small one."""
        _, height, width = image.shape
        if height * width <= self.settings.tile_size ** 2 or not can_tile(self.config):
            yield None, await self._submit((op, height, width), Work(image, scale), height * width)
            return
        padded = pad_to_stride(image, self.stride)
        tiles = plan_tiles(padded.shape[1], padded.shape[2], self.settings.tile_size, self.margin, self.stride)
        pending = []
        for tile in tiles:
            top, left = tile.source[:2]
            core = (tile.core[0] - top, tile.core[1] - left, tile.core[2] - top, tile.core[3] - left)
            source = tile.source_of(padded)
            pending.append(self._submit((op, *source.shape[1:]), Work(source, scale, core), source[0].size))
        _count("tiles", len(tiles))
        for i, tile in enumerate(tiles):
            result = await pending[i]
            pending[i] = None  # each tile's result is freed once it is placed
            yield tile, result

    def _submit(self, key: tuple, work: Work, pixels: int) -> asyncio.Future:
        try:
            return asyncio.wrap_future(self.batcher.submit(key, work, pixels))
        except QueueFull as err:
            raise RequestError(f"the server is busy: {err}; retry later", status=503) from None


def _count(what: str, amount: int = 1) -> None:
    from csc_serve.service.metrics import metrics

    m = metrics()
    (m.tiles if what == "tiles" else m.images.labels(endpoint=what)).inc(amount)


__all__ = ["Engine", "EncodeResult", "ImageResult", "Work"]
