"""The BentoML service: encode, decode, reconstruct and denoise images over HTTP, and show the atoms at work.

``bentoml serve`` from the repository root (``bentofile.yaml``) serves the bundled model on the fastest
backend here. Another model: ``CSC_MODEL=DIR_OR_TAG bentoml serve`` or ``bentoml serve --arg model=...``
(a model directory, a bundled name, or a model-store tag from ``csc import``); every other setting is in
``csc_serve.service.settings``. Files go up as ``multipart/form-data``; figures come back in ``X-CSC-*``
response headers beside the image or codes. Requests from concurrent clients share batches.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import bentoml
import numpy as np
from bentoml.validators import ContentType
from pydantic import BeforeValidator, Field, WithJsonSchema

from csc_serve.model_store import store_reference
from csc_serve.service.bodies import Route
from csc_serve.service.codes import read_codes, to_sparse
from csc_serve.service.guard import RequestGuard, use_cancelled_timeouts
from csc_serve.service.metrics import Timing, metrics
from csc_serve.service.payloads import RequestError, npy_bytes, png_bytes, read_image, read_keep_or_drop
from csc_serve.service.settings import DEFAULT_MODEL, ServeSettings
from csc_serve.service.ui import page_app

ARGUMENTS = vars(bentoml.use_arguments())  # bentoml serve --arg name=value
INLINE_BYTES = 1 << 17  # files and arrays up to this size are decoded and encoded on the event loop
IMAGE_OR_NPY = ("image/png", "application/octet-stream")  # output=png, output=npy
# Every endpoint: its file fields, the media types of its 200 answer, whether it waits for the model (503).
ROUTES = {
    "/encode": Route(files=("image",), answers=("application/octet-stream",)),
    "/decode": Route(files=("codes",), answers=IMAGE_OR_NPY),
    "/reconstruct": Route(files=("image",), answers=IMAGE_OR_NPY),
    "/denoise": Route(files=("image",), answers=IMAGE_OR_NPY),
    "/atoms": Route(answers=IMAGE_OR_NPY, form=True),
    "/explain": Route(files=("image",), answers=("application/octet-stream",)),
    "/metadata": Route(waits_for_model=False),
}

IMAGE_FIELD = Field(description="The image: a PNG, JPEG, BMP, TIFF, WebP, GIF or PPM file, or a .npy float array "
                    "(C, H, W) with values in [0, 1] (noisy images may leave that range). Upload it as a file "
                    "part; a URL is never fetched.", examples=["noisy.png"])
# Numbers are strict: pydantic's lax mode would read a form value of true or false as 1 or 0.
SCALE_FIELD = Field(1.0, ge=0, allow_inf_nan=False, strict=True, examples=[1.0, 3.0],
                    description="Multiplies every stage's sparsity threshold (1.0: as trained; larger: sparser "
                    "codes, more noise removed). At most max_lmbda_scale (100 by default).")
IMAGE_OUTPUT = Field("png", examples=["png", "npy"],
                     description="'png': an 8-bit PNG (clipped to [0, 1]); 'npy': the float32 (C, H, W) array, "
                     "neither clipped nor rounded.")
METADATA_EXAMPLE = {
    "ready": True, "error": None,
    "model": {"reference": "csc-ctrl-rgb", "kind": "bundled", "tag": None, "directory": "<hidden>",
              "weights_sha256": "f3c60355...", "config": {"in_channels": 3, "stages": ["..."]}, "total_stride": 4,
              "code_channels": 128, "tile_margin": 68},
    "backend": {"backend": "onnxruntime", "device": "cpu", "precision": "float32", "threads": 2,
                "artifacts": "<hidden>"},
    "artifacts": {"directory": "<hidden>", "onnx": {"encode": "20525102..."}},
    "versions": {"csc-serve": "0.1.0", "torch": "2.13.0+cpu", "onnxruntime": "1.32.0", "bentoml": "1.4.40"},
    "settings": {"model": "csc-ctrl-rgb", "backend": "auto", "max_batch_size": 32, "token": None,
                 "show_paths": False},
    "process": {"pid": 4242, "rss_bytes": 480000000},
}
Metadata = Annotated[dict[str, Any], WithJsonSchema({"type": "object", "example": METADATA_EXAMPLE})]
# BentoML reads every form field as JSON first, so a list of one atom ("17") arrives as a number.
AtomList = Annotated[str | None, BeforeValidator(lambda v: str(v) if type(v) in (int, float) else v)]
ATOM_LIST = ("comma-separated last-stage atom indices or inclusive ranges, e.g. '3,17,40-43'; blank: not "
             "given")
BinaryFile = Annotated[Path, ContentType("application/octet-stream")]
PngOrNpy = Annotated[Path, ContentType("image/png")]


def _settings_from_env() -> ServeSettings:
    return ServeSettings.from_env(ARGUMENTS)


# One worker process holds the model; the backend spreads each batch over the cores. No access log by default:
# formatting a line per request costs a tenth of the event loop's time on small images (turn it on with
# api_server.logging.access.enabled in a BENTOML_CONFIG file); /metrics counts the requests.
@bentoml.service(name="csc", workers=1, traffic={"timeout": 300}, logging={"access": {"enabled": False}})
class CSCService:
    """Convolutional sparse coding (CSC-CTRL) autoencoder: sparse codes, reconstructions, robust denoising."""

    # A model-store model is referenced here so that 'bentoml build' packs it; bundled models ship in the code.
    model_ref = store_reference(ARGUMENTS.get("model") or os.environ.get("CSC_MODEL") or DEFAULT_MODEL)

    def __init__(self, settings: ServeSettings | None = None) -> None:
        from csc_serve.service.engine import Engine

        self.settings = settings or _settings_from_env()
        self.engine = Engine(self.settings).start(background=True)

    def __is_ready__(self) -> bool:
        return self.engine.ready

    def __is_alive__(self) -> bool:
        return self.engine.error is None

    @bentoml.on_shutdown
    def close(self) -> None:
        self.engine.close()

    # ----------------------------------------------------------------------------- endpoints
    @bentoml.api
    async def encode(
        self,
        image: Path = IMAGE_FIELD,
        lmbda_scale: float | None = Field(None, ge=0, allow_inf_nan=False, strict=True, examples=[1.0, 3.0],
                                          description="Multiplies every stage's sparsity threshold (default 1.0: "
                                          "as trained; larger: sparser codes). At most max_lmbda_scale."),
        sigma: float | None = Field(None, ge=0, le=255, allow_inf_nan=False, strict=True, examples=[25.0],
                                    description="Encode as /denoise does for noise of this std (0..255): at its "
                                    "calibrated lmbda_scale, and with it for noise-adaptive thresholds. At most "
                                    "one of sigma and lmbda_scale."),
        output: Literal["sparse", "npy"] = Field("sparse", examples=["sparse", "npy"], description="'sparse': "
                                                 "the .npz sparse format (shape, indices, values; see below); "
                                                 "'npy': the dense float32 (K, h, w) codes."),
        value_dtype: Literal["float32", "float16"] = Field("float32", examples=["float32", "float16"],
                                                           description="dtype of 'values' in the sparse format."),
        stage_sparsity: bool = Field(True, examples=[True, False], description="Report every stage's "
                                     "sparsity (counted in the same pass); false: the last stage's only."),
    ) -> BinaryFile:
        """Last-stage sparse codes of an image.

        The body is an .npz archive readable with numpy.load(..., allow_pickle=False): shape int64 (K, h, w),
        indices int32 (flat C-order positions of the non-zero codes, increasing), values float32 (or float16),
        image_size int64 (H, W), sparsity float64 per stage, lmbda_scale. Dense codes:
        codes = np.zeros(prod(shape)); codes[indices] = values; codes = codes.reshape(shape).
        With output=npy the body is the dense (K, h, w) float32 .npy instead.
        Headers: X-CSC-Sparsity (fraction of zero codes per stage, comma-separated, first to last),
        X-CSC-Code-Shape (K,h,w), X-CSC-Image-Size (H,W), X-CSC-Lmbda-Scale, X-CSC-Sigma (when given),
        Server-Timing (every answer: the milliseconds of each stage of the request).
        """
        return await self._answer("encode", lambda t: self._encode(t, image, lmbda_scale, sigma, output, value_dtype,
                                                                   stage_sparsity))

    @bentoml.api
    async def decode(
        self,
        codes: Path = Field(description="Codes as returned by /encode: the sparse .npz, or a dense .npy float "
                            "array (K, h, w).", examples=["codes.npz"]),
        height: int | None = Field(None, ge=1, strict=True, examples=[481], description="Crop the image to this height "
                                   "(default: the image_size stored with sparse codes, else h * stride)."),
        width: int | None = Field(None, ge=1, strict=True, examples=[321], description="Crop the image to this width."),
        output: Literal["png", "npy"] = IMAGE_OUTPUT,
        keep: AtomList = Field(None, examples=["3,17,40-43"], description="Synthesise these atoms only: "
                               f"{ATOM_LIST}. At most one of keep and drop."),
        drop: AtomList = Field(None, examples=["0-7"], description=f"Leave these atoms out: {ATOM_LIST}."),
    ) -> PngOrNpy:
        """The image synthesised from last-stage codes; with keep or drop, the codes of the atoms not kept (or
        dropped) are zero first. Headers: X-CSC-Image-Size (H,W), X-CSC-Atoms-Kept (atoms left in)."""
        return await self._answer("decode", lambda t: self._decode(t, codes, height, width, output, keep, drop))

    @bentoml.api
    async def reconstruct(
        self,
        image: Path = IMAGE_FIELD,
        lmbda_scale: float = SCALE_FIELD,
        output: Literal["png", "npy"] = IMAGE_OUTPUT,
    ) -> PngOrNpy:
        """decode(encode(image)): the model's reconstruction.

        Headers: X-CSC-PSNR (dB, against the input), X-CSC-Sparsity (fraction of zero last-stage codes it was
        made of: of every shifted copy for a shift-averaged model), X-CSC-Lmbda-Scale.
        """
        return await self._answer("reconstruct", lambda t: self._reconstruct(t, image, lmbda_scale, output))

    @bentoml.api
    async def denoise(
        self,
        image: Path = IMAGE_FIELD,
        sigma: float | None = Field(None, ge=0, le=255, allow_inf_nan=False, strict=True, examples=[25.0],
                                    description="Std of the Gaussian noise on the 0..255 scale; its calibrated "
                                    "lmbda_scale is used. Leave it and lmbda_scale out to have it estimated."),
        lmbda_scale: float | None = Field(None, ge=0, allow_inf_nan=False, strict=True, examples=[3.0],
                                          description="Denoise at this threshold scale instead of a sigma."),
        output: Literal["png", "npy"] = IMAGE_OUTPUT,
    ) -> PngOrNpy:
        """Robust denoising: reconstruction at the threshold scale that removes noise of level sigma.

        Headers: X-CSC-Sigma (the level used, when one was given or estimated), X-CSC-Sigma-Source
        (given | estimated | none), X-CSC-Lmbda-Scale, X-CSC-Sparsity (fraction of zero last-stage codes it was
        made of).
        """
        return await self._answer("denoise", lambda t: self._denoise(t, image, sigma, lmbda_scale, output))

    @bentoml.api
    async def atoms(
        self,
        stage: int | None = Field(None, ge=0, strict=True, examples=[1], description="Encoder stage, from 0 "
                                  "(default: the last, whose atoms the served codes weigh)."),
        output: Literal["png", "npy"] = Field("png", examples=["png", "npy"], description="'png': a grid of the "
                                              "atoms; 'npy': the float32 (K, C, h, w) array."),
    ) -> PngOrNpy:
        """The dictionary atoms of one stage in pixel space (deeper atoms synthesised through the earlier
        dictionaries, as `csc viz` draws them), without the input mean; computed once per stage.

        npy: float32 (K, C, h, w), atom k first. png: the atoms row-major in index order on a rows x cols grid,
        each stretched to the full range on its own, 1 white pixel between neighbours and none around the
        edge (atom r*cols + c at top r*(h+1), left c*(w+1)). Headers: X-CSC-Atoms (K), X-CSC-Atom-Size (h,w),
        X-CSC-Grid (rows,cols; png only), X-CSC-Stage (the stage shown).
        """
        return await self._answer("atoms", lambda t: self._atoms(t, stage, output))

    @bentoml.api
    async def explain(
        self,
        image: Path = IMAGE_FIELD,
        lmbda_scale: float | None = Field(None, ge=0, allow_inf_nan=False, strict=True, examples=[1.0],
                                          description="Threshold scale (default 1.0, or the one for sigma)."),
        sigma: float | None = Field(None, ge=0, le=255, allow_inf_nan=False, strict=True, examples=[25.0],
                                    description="Use the lmbda_scale calibrated for this noise level (0..255), "
                                    "as /denoise does. At most one of sigma and lmbda_scale."),
        atoms: AtomList = Field(None, examples=["3,17,40-43"], description=f"The atoms to split out: {ATOM_LIST}; "
                                "at most 64 (default: the 'top' strongest, at most 64)."),
        top: int = Field(16, ge=1, strict=True, examples=[16], description="How many of the strongest atoms to "
                         "rank (at most K; larger values rank all K)."),
    ) -> BinaryFile:
        """The reconstruction split atom by atom: what each last-stage atom adds to the image.

        The body is an .npz archive readable with numpy.load(..., allow_pickle=False): energy float64 (K,)
        (sum of |code| per atom), top int64 (atoms by decreasing energy), atoms int64 (n,) (those split out,
        sorted), activations float32 (n, h, w) (their codes, as /encode returns them), contributions float32
        (n, C, H, W) (each atom's part of the reconstruction; for shift-averaged models the mean over the
        shifts /reconstruct averages), base float32 (C, H, W) (the input mean), reconstruction (C, H, W)
        (= base + the contributions of all K atoms), partial (base + the listed atoms' contributions), without
        (reconstruction less them), lmbda_scale float64, sigma float64 (nan when not given), image_size int64.
        Headers: X-CSC-Lmbda-Scale, X-CSC-Sparsity (fraction of zero last-stage codes), X-CSC-Top (the top
        atoms, comma-separated), X-CSC-PSNR (reconstruction against the input, dB).
        """
        return await self._answer("explain", lambda t: self._explain(t, image, lmbda_scale, sigma, atoms, top))

    @bentoml.api
    async def metadata(self) -> Metadata:
        """The served model (config, weights sha256), backend, artifact hashes, library versions, serving
        limits, readiness and this worker's memory.

        Filesystem paths (the model and artifact directories, and any path in another value) read
        "<hidden>" unless the server runs with CSC_SHOW_PATHS=true.
        """
        from csc_serve.service.metadata import describe

        return await asyncio.to_thread(describe, self.engine)

    # ----------------------------------------------------------------------------- the work
    async def _answer(self, endpoint: str, work) -> Any:
        """Run a request's coroutine ``work(timing)``; its ``RequestError`` becomes a JSON answer with a one-line
        ``error``. Every answer carries the request's ``Server-Timing``, and its stages go to ``/metrics``."""
        from starlette.responses import JSONResponse, Response

        timing = Timing()
        try:
            body, media_type, filename, headers = await work(timing)
        except RequestError as err:
            metrics().rejected.labels(status=str(err.status)).inc()
            return JSONResponse({"error": str(err)}, status_code=err.status,
                                headers={"Server-Timing": timing.header()})
        headers["Content-Disposition"] = f'inline; filename="{filename}"'
        headers["Server-Timing"] = timing.header()
        timing.observe(endpoint)
        return Response(body, media_type=media_type, headers=headers)

    async def _read_image(self, path: Path, timing: Timing):
        config, cap = self.engine.config, self.settings.max_pixels
        start = time.perf_counter()
        try:
            return await _off_loop(path.stat().st_size,
                                   lambda: read_image(path.read_bytes(), config.in_channels, cap, config.value_range))
        finally:
            timing.add("read", time.perf_counter() - start)

    async def _encode(self, timing: Timing, image: Path, lmbda_scale: float | None, sigma: float | None, output: str,
                      value_dtype: str, stage_sparsity: bool):
        source = await self._read_image(image, timing)
        result = await self.engine.encode(source, lmbda_scale, stage_sparsity, sigma=sigma, timing=timing)
        headers = {"X-CSC-Sparsity": ",".join(f"{v:.6f}" for v in result.sparsity),
                   "X-CSC-Code-Shape": ",".join(map(str, result.codes.shape)),
                   "X-CSC-Image-Size": ",".join(map(str, result.image_size)),
                   "X-CSC-Lmbda-Scale": _number(result.lmbda_scale)}
        if sigma is not None:
            headers["X-CSC-Sigma"] = _number(sigma)
        start = time.perf_counter()
        if output == "npy":
            body, name = await _off_loop(result.codes.nbytes, npy_bytes, result.codes), "codes.npy"
        else:
            body, name = await _off_loop(result.codes.nbytes, to_sparse, result.codes, result.image_size,
                                         result.sparsity, result.lmbda_scale, value_dtype), "codes.npz"
        timing.add("encode", time.perf_counter() - start)
        return body, "application/octet-stream", name, headers

    async def _decode(self, timing: Timing, codes: Path, height: int | None, width: int | None, output: str,
                      keep: str | None, drop: str | None):
        channels, cap = self.engine.config.code_channels, self.settings.max_code_values
        mask = read_keep_or_drop(keep, drop, channels)
        start = time.perf_counter()
        array, size = await _off_loop(codes.stat().st_size, lambda: read_codes(codes.read_bytes(), channels, cap))
        if mask is not None:
            array = await _off_loop(array.nbytes, np.multiply, array, mask[:, None, None])
        timing.add("read", time.perf_counter() - start)
        if size is None:  # a dense array carries no image size: the whole stride grid
            size = (array.shape[1] * self.engine.stride, array.shape[2] * self.engine.stride)
        size = (height or size[0], width or size[1])
        image = await self.engine.decode(array, size, timing=timing)
        headers = {"X-CSC-Image-Size": f"{size[0]},{size[1]}",
                   "X-CSC-Atoms-Kept": str(channels if mask is None else int(np.count_nonzero(mask)))}
        return await self._image_body(timing, image, output, "decoded", headers)

    async def _reconstruct(self, timing: Timing, image: Path, lmbda_scale: float, output: str):
        result = await self.engine.reconstruct(await self._read_image(image, timing), lmbda_scale, timing=timing)
        headers = {"X-CSC-PSNR": f"{result.psnr:.4f}", "X-CSC-Sparsity": f"{result.sparsity:.6f}",
                   "X-CSC-Lmbda-Scale": _number(result.lmbda_scale)}
        return await self._image_body(timing, result.image, output, "reconstruction", headers)

    async def _denoise(self, timing: Timing, image: Path, sigma: float | None, lmbda_scale: float | None, output: str):
        result = await self.engine.denoise(await self._read_image(image, timing), sigma, lmbda_scale, timing=timing)
        headers = {"X-CSC-Sigma-Source": result.sigma_source or "none",
                   "X-CSC-Lmbda-Scale": _number(result.lmbda_scale), "X-CSC-Sparsity": f"{result.sparsity:.6f}"}
        if result.sigma is not None:
            headers["X-CSC-Sigma"] = _number(result.sigma)
        return await self._image_body(timing, result.image, output, "denoised", headers)

    async def _atoms(self, timing: Timing, stage: int | None, output: str):
        result = await self.engine.atoms(stage)
        k, _, h, w = result.atoms.shape
        headers = {"X-CSC-Atoms": str(k), "X-CSC-Atom-Size": f"{h},{w}", "X-CSC-Stage": str(result.stage)}
        if output == "npy":
            return npy_bytes(result.atoms), "application/octet-stream", f"atoms_stage{result.stage}.npy", headers
        headers["X-CSC-Grid"] = ",".join(map(str, result.layout))
        body = await _off_loop(result.grid.nbytes, png_bytes, result.grid[None] if result.grid.ndim == 2
                               else result.grid.transpose(2, 0, 1), (0, 255))
        return body, "image/png", f"atoms_stage{result.stage}.png", headers

    async def _explain(self, timing: Timing, image: Path, lmbda_scale: float | None, sigma: float | None,
                       atoms: str | None, top: int):
        source = await self._read_image(image, timing)
        result = await self.engine.explain(source, lmbda_scale, sigma, atoms, top)
        headers = {"X-CSC-Lmbda-Scale": _number(result.lmbda_scale), "X-CSC-Sparsity": f"{result.sparsity:.6f}",
                   "X-CSC-Top": ",".join(map(str, result.top)), "X-CSC-PSNR": f"{result.psnr:.4f}"}
        body = await asyncio.to_thread(_explain_npz, result, source.shape[1:])
        return body, "application/octet-stream", "explain.npz", headers

    async def _image_body(self, timing: Timing, image, output: str, stem: str, headers: dict[str, str]):
        start = time.perf_counter()
        if output == "npy":
            body, media_type, name = await _off_loop(image.nbytes, npy_bytes, image), "application/octet-stream", "npy"
        else:
            body = await _off_loop(image.nbytes, png_bytes, image, self.engine.config.value_range)
            media_type, name = "image/png", "png"
        timing.add("encode", time.perf_counter() - start)
        return body, media_type, f"{stem}.{name}", headers


def _explain_npz(result, image_size: tuple[int, int]) -> bytes:
    """The /explain answer: the arrays its docstring lists, in an uncompressed .npz."""
    e = result.explanation
    listed = e.contributions.sum(axis=0)  # (C, H, W); zeros when no atom is listed
    out = io.BytesIO()
    np.savez(out, energy=e.energy, top=result.top, atoms=e.atoms, activations=e.codes[e.atoms],
             contributions=e.contributions, base=e.base, reconstruction=e.reconstruction, partial=e.base + listed,
             without=e.reconstruction - listed, lmbda_scale=np.float64(result.lmbda_scale),
             sigma=np.float64(np.nan if result.sigma is None else result.sigma),
             image_size=np.array(image_size, np.int64))
    return out.getvalue()


async def _off_loop(size: int, work, *args):
    """Decode or encode ``size`` bytes: small ones on the event loop (a thread hop would cost more than the
    work), large ones in a worker thread so the loop keeps serving meanwhile."""
    if size <= INLINE_BYTES:
        return work(*args)
    return await asyncio.to_thread(work, *args)


def _number(value: float) -> str:
    return format(float(value), ".9g")  # float32 round-trips


CSCService.add_asgi_middleware(RequestGuard, settings=_settings_from_env, routes=ROUTES)
use_cancelled_timeouts()
# The browser page at /ui/ (files open like /docs.json; its API calls carry the token). / stays BentoML's docs.
CSCService.mount_asgi_app(page_app(), path="/ui", name="ui")
