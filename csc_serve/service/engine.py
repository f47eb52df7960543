"""The serving engine: one model, its backend and the batcher, behind per-image coroutines.

``Engine`` answers ``encode``, ``decode``, ``reconstruct`` and ``denoise`` for one float32 ``(C, H, W)``
image (or ``(K, h, w)`` codes) per call, and ``atoms`` and ``explain`` from the PyTorch model
(``csc_serve.models.explain``) in a worker thread. Calls are coroutines: any number of them, from any event loop,
wait on the batcher without holding a thread, and meet there in batches (``csc_serve.service.batch_call``).
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
import time
from dataclasses import dataclass

import numpy as np

from csc_serve.model_store import resolve_source
from csc_serve.models.calibration import scale_for_sigma
from csc_serve.models.images import pad_to_stride
from csc_serve.models.metrics import psnr
from csc_serve.service.batch_call import Work, run_batch
from csc_serve.service.batcher import Batcher, QueueFull
from csc_serve.service.metrics import Timing
from csc_serve.service.payloads import RequestError, read_atom_list
from csc_serve.service.settings import ServeSettings
from csc_serve.service.tiling import can_tile, plan_tiles, receptive_margin

logger = logging.getLogger("csc_serve")

WARMUP_SIZE = 64
MAX_EXPLAINED_ATOMS = 64  # atoms whose contributions one /explain answer may hold


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
    sparsity: float | None = None  # fraction of zero last-stage codes it was made of
    psnr: float | None = None  # dB, of the reconstruction (clipped to [0, 1]) against the input
    sigma: float | None = None  # the noise level denoised for (0..255)
    sigma_source: str | None = None  # "given", "estimated", or None when lmbda_scale was given


@dataclass(frozen=True)
class AtomsResult:
    stage: int
    atoms: np.ndarray  # (K, C, h, w) float32: the stage's atoms in pixel space
    grid: np.ndarray  # uint8 (rows*h + rows-1, cols*w + cols-1[, 3]): the atoms tiled, 1-pixel separators
    layout: tuple[int, int]  # (rows, cols) of the grid


@dataclass(frozen=True)
class ExplainResult:
    explanation: object  # csc_serve.models.explain.Explanation
    top: np.ndarray  # int64: atom indices by decreasing energy
    lmbda_scale: float
    sigma: float | None  # the sigma given, if one was
    sparsity: float  # fraction of zero last-stage codes
    psnr: float  # dB, of the reconstruction (clipped to [0, 1]) against the input


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
        self._atoms: dict[int, AtomsResult] = {}  # per stage, computed on first request
        self._explaining = threading.Lock()  # one explanation at a time: each uses every core it is given
        self._loading_model = threading.Lock()

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
        from csc_serve.service.metrics import observe_batch

        try:  # PyTorch is imported only to export missing graphs, for the torch backend, or by torch_model
            self.backend = load_backend(self.source, self.settings.backend)
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
        return run_batch(self.config, self.backend, key, items)

    def _warm_up(self) -> None:
        """Every operation once, at batch 1 and 2, so the first requests meet initialised sessions."""
        shape = (self.config.in_channels, WARMUP_SIZE, WARMUP_SIZE)
        image = (0.5 + 0.1 * np.random.default_rng(0).standard_normal(shape)).astype(np.float32)
        for count in (1, 2):  # denoise runs the reconstruct graph too
            self._run_batch(("reconstruct", *image.shape[1:]), [Work(image)] * count)
            codes = self._run_batch(("encode", *image.shape[1:]), [Work(image)] * count)[0].array
            self._run_batch(("decode", *codes.shape), [Work(codes)] * count)
        self.estimate_sigma(image)

    def torch_model(self):
        """The PyTorch model for /atoms and /explain, loaded on first use; beside another backend on one thread."""
        with self._loading_model:
            if self.model is None:
                import torch

                from csc_serve.models import load_pretrained

                if self.backend is not None and self.backend.name != "torch":
                    torch.set_num_threads(1)
                self.model = load_pretrained(self.source.directory)
            return self.model

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
    async def encode(self, image: np.ndarray, lmbda_scale: float | None = None, stage_sparsity: bool = True,
                     sigma: float | None = None, timing: Timing | None = None) -> EncodeResult:
        """Last-stage codes of one image at ``lmbda_scale`` (default 1), or as ``denoise`` codes it for the noise
        level ``sigma`` (0..255): at the scale calibrated for it, and with it for noise-adaptive thresholds.
        The sparsity of every stage (``stage_sparsity``) or of the last, from the same pass."""
        self._require_ready()
        scale, sigma = self._scale_and_sigma(lmbda_scale, sigma)
        h, w = (-(-n // self.stride) for n in image.shape[1:])
        count = self.config.code_channels * h * w
        if count > self.settings.max_code_values:
            raise RequestError(f"image: its codes would hold {count} values, beyond the cap of "
                               f"{self.settings.max_code_values}", status=413)
        codes = None
        earlier = np.zeros((len(self.config.stages) - 1, 2), np.int64)  # (zeros, codes) of each earlier stage
        async for tile, result in self._tiles_or_whole("encode", image, scale, sigma, timing):
            if tile is None:
                codes = result.array  # the batch's output, not copied
            else:
                if codes is None:
                    codes = np.empty((self.config.code_channels, h, w), np.float32)
                codes[(slice(None), *tile.core_in_image(self.stride))] = \
                    result.array[(slice(None), *tile.core_in_source(self.stride))]
            earlier += np.asarray(result.zeros, np.int64).reshape(earlier.shape)
        sparsity = [1.0 - np.count_nonzero(codes) / codes.size]
        if stage_sparsity:
            sparsity = [float(zeros / total) for zeros, total in earlier] + sparsity
        _count("encode")
        return EncodeResult(codes, tuple(image.shape[1:]), sparsity, scale)

    async def decode(self, codes: np.ndarray, output_size: tuple[int, int] | None = None,
                     timing: Timing | None = None) -> np.ndarray:
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
        image = await self._submit(key, Work(codes, output_size=(height, width), timing=timing), height * width)
        _count("decode")
        return image

    async def reconstruct(self, image: np.ndarray, lmbda_scale: float = 1.0,
                          timing: Timing | None = None) -> ImageResult:
        """``decode(encode(image))`` (shift-averaged where the model says so), its PSNR and code sparsity."""
        self._require_ready()
        scale = self.check_scale(lmbda_scale)
        out, sparsity = await self._image_call("reconstruct", image, scale, 0.0, timing)
        _count("reconstruct")
        return ImageResult(out, scale, sparsity, psnr=psnr(out, image, clip=True))

    async def denoise(self, image: np.ndarray, sigma: float | None = None, lmbda_scale: float | None = None,
                      timing: Timing | None = None) -> ImageResult:
        """Reconstruct at the scale calibrated for ``sigma`` (0..255), estimated from the image when neither
        ``sigma`` nor ``lmbda_scale`` is given; or at ``lmbda_scale`` itself (then a noise-adaptive model's
        thresholds see no noise level)."""
        self._require_ready()
        if sigma is not None and lmbda_scale is not None:
            raise RequestError("give sigma or lmbda_scale, not both")
        source = None
        if lmbda_scale is None:
            if sigma is None:
                start = time.perf_counter()
                sigma, source = await asyncio.to_thread(self.estimate_sigma, image), "estimated"
                if timing is not None:
                    timing.add("estimate", time.perf_counter() - start)
            else:
                sigma, source = self.check_sigma(sigma), "given"
            lmbda_scale = self.scale_for_sigma(sigma)
        scale = self.check_scale(lmbda_scale)
        out, sparsity = await self._image_call("denoise", image, scale, sigma or 0.0, timing)
        _count("denoise")
        return ImageResult(out, scale, sparsity, sigma=sigma, sigma_source=source)

    async def atoms(self, stage: int | None = None) -> AtomsResult:
        """The atoms of ``stage`` (default: the last) in pixel space and as a grid, computed once per stage."""
        self._require_ready()
        last = len(self.config.stages) - 1
        stage = last if stage is None else int(stage)
        if not 0 <= stage <= last:
            raise RequestError(f"stage must lie in [0, {last}] (the model has {last + 1} stages), got {stage}")
        if stage not in self._atoms:
            self._atoms[stage] = await asyncio.to_thread(self._draw_atoms, stage)
        _count("atoms")
        return self._atoms[stage]

    def _draw_atoms(self, stage: int) -> AtomsResult:
        import torch

        from csc_serve.models.explain import pixel_atoms, tile_atoms

        model = self.torch_model()
        with torch.inference_mode():
            atoms = pixel_atoms(model, stage).float().numpy()
        grid, layout = tile_atoms(atoms)
        return AtomsResult(stage, atoms, grid, layout)

    async def explain(self, image: np.ndarray, lmbda_scale: float | None = None, sigma: float | None = None,
                      atoms: str | None = None, top: int = 16) -> ExplainResult:
        """The reconstruction at ``lmbda_scale`` (or the scale calibrated for ``sigma``; neither: 1) split by
        atom: the contributions of the listed ``atoms`` (default: the ``top`` ones, at most 64), and every
        atom's energy. ``top`` above the number of atoms means all of them."""
        self._require_ready()
        scale, noise = self._scale_and_sigma(lmbda_scale, sigma)
        num_atoms = self.config.code_channels
        chosen = read_atom_list(atoms, num_atoms, "atoms", MAX_EXPLAINED_ATOMS)
        if int(top) < 1:
            raise RequestError(f"top must be at least 1, got {top}")
        top = min(int(top), num_atoms)
        count = (min(top, MAX_EXPLAINED_ATOMS) if chosen is None else len(chosen)) * image.size
        if count > self.settings.max_explain_values:
            raise RequestError(f"image: the contributions of {count // image.size} atoms would hold {count} "
                               f"values, beyond the cap of {self.settings.max_explain_values}", status=413)
        strongest = min(top, MAX_EXPLAINED_ATOMS)
        explanation = await asyncio.to_thread(self._explain, image, chosen, scale, strongest, noise)
        _count("explain")
        codes, ranked = explanation.codes, np.argsort(-explanation.energy, kind="stable")[:top].astype(np.int64)
        return ExplainResult(explanation, ranked, scale, None if sigma is None else noise,
                             sparsity=1.0 - np.count_nonzero(codes) / codes.size,
                             psnr=psnr(explanation.reconstruction, image, clip=True))

    def _explain(self, image: np.ndarray, atoms: np.ndarray | None, scale: float, strongest: int, sigma: float):
        import torch

        from csc_serve.models.explain import explain

        model = self.torch_model()
        with self._explaining, torch.inference_mode():
            try:
                return explain(model, image, atoms, scale, strongest=strongest, sigma=sigma)
            except ValueError as err:  # an image the model cannot take (too small for a circular boundary)
                raise RequestError(f"image: {' '.join(str(err).split())}") from None

    # ----------------------------------------------------------------------------- checks
    def _scale_and_sigma(self, lmbda_scale: float | None, sigma: float | None) -> tuple[float, float]:
        """The scale and noise level of a call that takes either: ``sigma`` gives its calibrated scale; neither
        gives scale 1 and no noise."""
        if sigma is not None and lmbda_scale is not None:
            raise RequestError("give sigma or lmbda_scale, not both")
        if sigma is None:
            return self.check_scale(1.0 if lmbda_scale is None else lmbda_scale), 0.0
        sigma = self.check_sigma(sigma)
        return self.check_scale(self.scale_for_sigma(sigma)), sigma

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
        scale = float(scale_for_sigma(self.config.noise_calibration, sigma)[0])
        if scale > self.settings.max_lmbda_scale:
            raise RequestError(f"sigma {sigma:g} calls for lmbda_scale {scale:.3g}, beyond the cap of "
                               f"{self.settings.max_lmbda_scale:g}")
        return scale

    @staticmethod
    def estimate_sigma(image: np.ndarray) -> float:
        from csc_serve.models.noise import estimate_noise_sigma

        try:
            return float(estimate_noise_sigma(image)[0])
        except ValueError as err:
            raise RequestError(f"cannot estimate the noise level ({err}); pass sigma or lmbda_scale") from None

    # ----------------------------------------------------------------------------- batches and tiles
    async def _image_call(self, op: str, image: np.ndarray, scale: float, sigma: float,
                          timing: Timing | None) -> tuple[np.ndarray, float]:
        """``reconstruct`` or ``denoise``: the image, and the fraction of zero codes it was made of."""
        out = np.empty_like(image)
        zeros = total = 0
        async for tile, result in self._tiles_or_whole(op, image, scale, sigma, timing):
            if tile is None:
                out[...] = result.array
            else:
                inside = out[(slice(None), *tile.core_in_image())]  # the stride padding stays outside
                inside[...] = result.array[(slice(None), *tile.core_in_source())][..., : inside.shape[1],
                                                                                  : inside.shape[2]]
            (tile_zeros, tile_total), = result.zeros
            zeros, total = zeros + tile_zeros, total + tile_total
        return out, zeros / total

    async def _tiles_or_whole(self, op: str, image: np.ndarray, scale: float, sigma: float, timing: Timing | None):
        """``(tile, result)`` for each tile of a large image, or ``(None, result)`` for a small one; each
        result a ``csc_serve.service.batch_call.Counted``."""
        _, height, width = image.shape
        if height * width <= self.settings.tile_size ** 2 or not can_tile(self.config):
            work = Work(image, scale, sigma=sigma, timing=timing)
            yield None, await self._submit((op, height, width), work, height * width)
            return
        padded = pad_to_stride(image, self.stride)
        tiles = plan_tiles(padded.shape[1], padded.shape[2], self.settings.tile_size, self.margin, self.stride)
        pending = []
        for tile in tiles:
            top, left = tile.source[:2]
            core = (tile.core[0] - top, tile.core[1] - left, tile.core[2] - top, tile.core[3] - left)
            source = tile.source_of(padded)
            work = Work(source, scale, core, sigma=sigma, timing=timing)
            pending.append(self._submit((op, *source.shape[1:]), work, source[0].size))
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


__all__ = ["AtomsResult", "Engine", "EncodeResult", "ExplainResult", "ImageResult", "Work"]
