"""A Python client of the csc-serve HTTP service: numpy arrays or image files in, float32 arrays out.

    from csc_serve.client import Client

    with Client("http://localhost:3000") as client:
        codes = client.encode("noisy.png", sparse=True)       # SparseCodes; codes.dense() is (K, h, w)
        image = client.decode(codes, keep=[3, 17])            # (C, H, W) float32 from two atoms only
        result = client.denoise("noisy.png", sigma=25)        # result.image, result.lmbda_scale

An image is a path to an image file (sent as its bytes), the bytes of one, or a numpy array: floats
``(C, H, W)`` in [0, 1] (noisy images may leave that range; ``(H, W)`` is grey, repeated to the model's
channels as read once from ``/metadata``), or uint8 pixels ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` (sent as
a lossless PNG, read by the server as it reads image files). Arrays come back as ``.npy`` (``output=npy``), so
nothing is clipped or rounded to 8 bits, and every answer is read with ``numpy.load(..., allow_pickle=False)``.

One connection pool per client, kept alive, shareable by threads. Errors are ``ClientError``: ``ServiceError``
for an error status (``status``, one-line ``message``), ``ServiceUnreachable`` (a ``ConnectionError``) when no
connection is made or it breaks, ``ServiceTimeout`` (a ``TimeoutError``) past ``timeout``; input it cannot send
gets ``TypeError`` or ``ValueError`` before any request. Needs httpx (the ``client`` extra).
"""

from __future__ import annotations

import io
import operator
import os
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Union
from urllib.parse import urlsplit

import numpy as np

__all__ = ["Client", "ClientError", "Denoised", "Explanation", "Reconstruction", "ServiceError", "ServiceTimeout",
           "ServiceUnreachable", "SparseCodes"]

Image = Union[np.ndarray, str, os.PathLike, bytes]
Atoms = Union[Iterable[int], str]


# ----------------------------------------------------------------------------- errors
class ClientError(Exception):
    """Anything that kept a request from giving its answer."""


class ServiceError(ClientError):
    """An error status: ``status`` (e.g. 400), ``message`` (the one-line ``error``), ``route`` and ``detail``."""

    def __init__(self, status: int, message: str, route: str = "", detail: Any = None):
        super().__init__(f"{route + ': ' if route else ''}{message} (HTTP {status})")
        self.status, self.message, self.route, self.detail = status, message, route, detail


class ServiceUnreachable(ClientError, ConnectionError):
    """No connection to the server could be made, or it broke before the answer was complete."""


class ServiceTimeout(ClientError, TimeoutError):
    """The server did not answer within the client's timeout."""


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True, eq=False)
class SparseCodes:
    """Last-stage codes in the sparse format of ``/encode``: the non-zero codes of a ``(K, h, w)`` array.

    ``indices`` are their flat C-order positions (increasing), ``values`` the codes (float32), ``image_size``
    the ``(H, W)`` of the image they describe (``decode`` crops to it), ``sparsity`` the fraction of zero codes
    per encoder stage, first to last, and ``lmbda_scale`` the threshold scale they were computed with.
    """

    shape: tuple[int, int, int]
    indices: np.ndarray
    values: np.ndarray
    image_size: tuple[int, int]
    sparsity: tuple[float, ...]
    lmbda_scale: float

    def dense(self) -> np.ndarray:
        """The float32 ``(K, h, w)`` codes."""
        codes = np.zeros(int(np.prod(self.shape)), np.float32)
        codes[self.indices] = self.values
        return codes.reshape(self.shape)

    def to_npz(self) -> bytes:
        """The ``.npz`` archive ``/encode`` answers with (what ``curl -F codes=@codes.npz .../decode`` takes)."""
        out = io.BytesIO()
        np.savez(out, shape=np.array(self.shape, np.int64), indices=self.indices, values=self.values,
                 image_size=np.array(self.image_size, np.int64), sparsity=np.array(self.sparsity, np.float64),
                 lmbda_scale=np.array(self.lmbda_scale, np.float32))
        return out.getvalue()

    @classmethod
    def from_npz(cls, data: bytes) -> SparseCodes:
        """Codes from the bytes of an ``/encode`` archive."""
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            return cls(shape=tuple(int(v) for v in f["shape"]), indices=f["indices"], values=f["values"],
                       image_size=tuple(int(v) for v in f["image_size"]),
                       sparsity=tuple(float(v) for v in f["sparsity"]), lmbda_scale=float(f["lmbda_scale"]))


@dataclass(frozen=True, eq=False)
class Reconstruction:
    """``image``: float32 ``(C, H, W)``; ``psnr`` (dB, against the input), ``sparsity`` (fraction of zero
    last-stage codes) and ``lmbda_scale``, from the answer's headers."""

    image: np.ndarray
    psnr: float
    sparsity: float
    lmbda_scale: float


@dataclass(frozen=True, eq=False)
class Denoised:
    """``image``: float32 ``(C, H, W)``; ``sigma``: the noise level used (0..255; None when a ``lmbda_scale`` was
    given instead), ``sigma_source``: ``"given"``, ``"estimated"`` or ``"none"``, the ``lmbda_scale``, and
    ``sparsity``: the fraction of zero last-stage codes the image was made of."""

    image: np.ndarray
    sigma: float | None
    sigma_source: str
    lmbda_scale: float
    sparsity: float


@dataclass(frozen=True, eq=False)
class Explanation:
    """What ``/explain`` answers: an image's last-stage atoms and their part of its reconstruction.

    ``energy`` float64 ``(K,)`` (sum of |code| per atom), ``top`` int64 (atom indices by decreasing energy),
    ``atoms`` int64 ``(n,)`` (the requested atoms, sorted), ``activations`` float32 ``(n, h, w)`` (their code
    maps), ``contributions`` float32 ``(n, C, H, W)`` (their parts of the reconstruction), ``base`` (the image of
    all-zero codes), ``reconstruction``, ``partial`` (base plus the requested atoms' parts) and ``without`` (the
    reconstruction less them), each float32 ``(C, H, W)``; ``lmbda_scale``, ``sigma`` (None when not given),
    ``image_size`` ``(H, W)``; ``psnr`` and ``sparsity`` from the headers (nan when absent).
    """

    energy: np.ndarray
    top: np.ndarray
    atoms: np.ndarray
    activations: np.ndarray
    contributions: np.ndarray
    base: np.ndarray
    reconstruction: np.ndarray
    partial: np.ndarray
    without: np.ndarray
    lmbda_scale: float
    sigma: float | None
    image_size: tuple[int, int]
    psnr: float
    sparsity: float


EXPLAIN_ARRAYS = tuple(field.name for field in fields(Explanation) if field.type == "np.ndarray")


# ----------------------------------------------------------------------------- the client
class Client:
    """``Client("http://localhost:3000", token=None, timeout=60.0)``: the service's endpoints as methods.

    ``token``: the server's ``CSC_SERVE_TOKEN``, sent as ``Authorization: Bearer <token>`` (needed when the
    server has one; never read from the environment, so it goes only where it is given). ``timeout``: seconds
    to wait for a connection and for each read or write (None: no limit; the server gives up after 300 s).
    Use it as a context manager, or call ``close()``, to release its connections.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float | None = 60.0):
        try:
            import httpx
        except ImportError:
            raise ImportError('csc_serve.client needs httpx: pip install "csc-serve[client]"') from None
        from csc_serve import __version__

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"url must be http://HOST[:PORT][/PATH] or https://..., got {url!r}")
        if token is not None and (not isinstance(token, str) or not token.strip()):
            raise ValueError("token must be a non-empty string (the server's CSC_SERVE_TOKEN), or None")
        self.url, self.timeout = url.rstrip("/"), timeout
        headers = {"User-Agent": f"csc-serve-client/{__version__}"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token.strip()}"
        self._token_set = token is not None
        self._httpx = httpx
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout))
        self._channels: int | None = None

    def __repr__(self) -> str:
        return f"Client({self.url!r}, token={'<set>' if self._token_set else None}, timeout={self.timeout})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections; later calls raise ``ClientError``."""
        self._http.close()

    # ----------------------------------------------------------------------------- endpoints
    def encode(self, image: Image, lmbda_scale: float | None = None, sparse: bool = False,
               sigma: float | None = None) -> np.ndarray | SparseCodes:
        """Last-stage codes of ``image`` at ``lmbda_scale`` (default 1), or as ``denoise`` codes it for noise of level
        ``sigma`` (0..255): float32 ``(K, h, w)``, or with ``sparse=True`` a ``SparseCodes`` (smaller on the wire,
        with the image size and every stage's sparsity)."""
        data = _form(lmbda_scale=_number(lmbda_scale), sigma=_number(sigma))
        if sparse:
            return SparseCodes.from_npz(self._post("/encode", self._image_file(image), data).content)
        data.update(output="npy", stage_sparsity="false")  # the dense answer carries no sparsity
        return _array(self._post("/encode", self._image_file(image), data))

    def decode(self, codes: np.ndarray | SparseCodes | str | os.PathLike, height: int | None = None,
               width: int | None = None, keep: Atoms | None = None, drop: Atoms | None = None) -> np.ndarray:
        """The float32 ``(C, H, W)`` image synthesised from last-stage codes: a float ``(K, h, w)`` array,
        ``SparseCodes``, or the path of a saved ``.npz`` / ``.npy``. ``height`` and ``width`` crop it (default:
        the image size of sparse codes, else the whole code grid). ``keep`` or ``drop`` (atom indices, or the
        server's list syntax such as ``"3,40-43"``; not both) zero the codes of the other or of those atoms."""
        if keep is not None and drop is not None:
            raise ValueError("give keep or drop, not both")
        if isinstance(codes, SparseCodes):
            file = ("codes.npz", codes.to_npz())
        elif isinstance(codes, np.ndarray):
            if codes.dtype.kind != "f":
                raise TypeError(f"dense codes must be a float (K, h, w) array, got {codes.dtype}")
            file = ("codes.npy", _npy(codes.astype(np.float32, copy=False)))
        elif isinstance(codes, (str, os.PathLike)):
            file = (Path(codes).name, Path(codes).read_bytes())
        else:
            raise TypeError(f"codes must be a float array, SparseCodes or a file path, got {type(codes).__name__}")
        kept, dropped = (None if v is None else _atom_list(v, name) for v, name in ((keep, "keep"), (drop, "drop")))
        if kept == "":
            raise ValueError("keep=[] keeps no atom (decode zero codes for the image of no atom)")
        data = _form(output="npy", height=_integer(height), width=_integer(width), keep=kept,
                     drop=dropped or None)  # dropping no atom: the plain synthesis
        return _array(self._post("/decode", {"codes": file}, data))

    def reconstruct(self, image: Image, lmbda_scale: float = 1.0) -> Reconstruction:
        """decode(encode(image)) as the model serves it (shift-averaged where the model says so)."""
        response = self._post("/reconstruct", self._image_file(image),
                              {"lmbda_scale": _number(lmbda_scale), "output": "npy"})
        return Reconstruction(_array(response), _header(response, "x-csc-psnr"),
                              _header(response, "x-csc-sparsity"), _header(response, "x-csc-lmbda-scale"))

    def denoise(self, image: Image, sigma: float | None = None, lmbda_scale: float | None = None) -> Denoised:
        """The reconstruction at the threshold scale calibrated for noise of level ``sigma`` (0..255), at
        ``lmbda_scale`` itself, or, with neither, at the level the server estimates from the image."""
        data = _form(output="npy", sigma=_number(sigma), lmbda_scale=_number(lmbda_scale))
        response = self._post("/denoise", self._image_file(image), data)
        given = response.headers.get("x-csc-sigma")
        return Denoised(_array(response), None if given is None else float(given), response.headers.get(
            "x-csc-sigma-source", "none"), _header(response, "x-csc-lmbda-scale"), _header(response, "x-csc-sparsity"))

    def atoms(self, stage: int | None = None) -> np.ndarray:
        """The atoms of the last stage (or of ``stage``, counted from 0) in pixel space: float32 ``(K, C, h, w)``,
        atom k at index k."""
        body = {"output": "npy"} if stage is None else {"output": "npy", "stage": operator.index(stage)}
        return _array(self._post("/atoms", json=body))

    def explain(self, image: Image, atoms: Atoms = (), lmbda_scale: float | None = None,
                sigma: float | None = None, top: int = 16) -> Explanation:
        """Which last-stage atoms make up ``image``'s reconstruction: every atom's energy, the ``top`` strongest,
        and for the requested ``atoms`` (at most 64; none: the top ones) their code maps and their parts of the
        image. The scale is ``lmbda_scale``, or the one calibrated for ``sigma``, or 1."""
        data = _form(atoms=_atom_list(atoms, "atoms") or None, lmbda_scale=_number(lmbda_scale),
                     sigma=_number(sigma), top=_integer(top))
        response = self._post("/explain", self._image_file(image), data)
        try:
            with np.load(io.BytesIO(response.content), allow_pickle=False) as f:
                arrays = {name: f[name] for name in EXPLAIN_ARRAYS}
                sigma_used, scale, size = float(f["sigma"]), float(f["lmbda_scale"]), f["image_size"]
        except (KeyError, ValueError, OSError) as err:
            raise ClientError(f"/explain: the answer is not the archive this client reads ({err})") from None
        return Explanation(**arrays, lmbda_scale=scale, sigma=None if np.isnan(sigma_used) else sigma_used,
                           image_size=(int(size[0]), int(size[1])), psnr=_header(response, "x-csc-psnr"),
                           sparsity=_header(response, "x-csc-sparsity"))

    def metadata(self) -> dict[str, Any]:
        """The served model (config, weights sha256), backend, artifact hashes, versions, limits, readiness."""
        return self._post("/metadata").json()

    # ----------------------------------------------------------------------------- requests
    def _post(self, route: str, files: dict | None = None, data: dict | None = None, json: Any = None):
        """POST a multipart form (``files`` and ``data``), a JSON body, or nothing; the answer if it is a 2xx."""
        httpx = self._httpx
        if self._http.is_closed:
            raise ClientError("this client is closed")
        try:
            response = self._http.post(route, files=files, data=data, json=json)
        except httpx.ConnectTimeout as err:
            raise ServiceUnreachable(f"cannot reach {self.url}: no connection within {self.timeout} s") from err
        except httpx.TimeoutException as err:
            raise ServiceTimeout(f"{route}: no answer from {self.url} within {self.timeout} s") from err
        except httpx.TransportError as err:
            raise ServiceUnreachable(f"cannot reach {self.url}{route}: {_one_line(err)}") from err
        if not response.is_success:
            raise _service_error(route, response)
        return response

    def _image_file(self, image: Image) -> dict[str, tuple[str, bytes, str]]:
        """The multipart ``image`` part for an image path, its bytes, or an array (see the module docstring)."""
        if isinstance(image, (bytes, bytearray, memoryview)):
            name, body = "image", bytes(image)
        elif isinstance(image, (str, os.PathLike)):
            name, body = Path(image).name or "image", Path(image).read_bytes()
        elif isinstance(image, np.ndarray):
            name, body = self._array_file(image)
        else:
            raise TypeError(f"image must be a numpy array, a file path or file bytes, got {type(image).__name__}")
        return {"image": (name, body, "application/octet-stream")}

    def _array_file(self, image: np.ndarray) -> tuple[str, bytes]:
        if image.dtype == np.uint8:
            pixels = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
            if pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (3, 4)):
                from PIL import Image as PILImage

                out = io.BytesIO()
                PILImage.fromarray(np.ascontiguousarray(pixels)).save(out, format="PNG", compress_level=1)
                return "image.png", out.getvalue()
            raise ValueError(f"a uint8 array is read as pixels (H, W), (H, W, 3) or (H, W, 4), got shape "
                             f"{image.shape}; pass channel-first images as floats in [0, 1]")
        if image.dtype.kind != "f":
            raise TypeError(f"an image array must hold floats (C, H, W) in [0, 1] or uint8 pixels (H, W, C), "
                            f"got {image.dtype}")
        if image.ndim == 2:  # grey: one channel, or three equal ones as the server makes of a grey file
            channels = self._model_channels()
            image = np.repeat(image[None], channels, axis=0) if channels else image
        elif image.ndim not in (3, 4):
            raise ValueError(f"a float image array must be (C, H, W) or (H, W), got shape {image.shape}")
        return "image.npy", _npy(image.astype(np.float32, copy=False))

    def _model_channels(self) -> int | None:
        if self._channels is None:
            config = self.metadata().get("model", {}).get("config") or {}
            self._channels = config.get("in_channels")
        return self._channels


# ----------------------------------------------------------------------------- wire formats
def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(array), allow_pickle=False)
    return out.getvalue()


def _array(response) -> np.ndarray:
    try:
        return np.load(io.BytesIO(response.content), allow_pickle=False)
    except (ValueError, OSError) as err:
        route = response.request.url.path
        raise ClientError(f"{route}: the answer is not a .npy array ({_one_line(err)})") from None


def _form(**fields: str | None) -> dict[str, str]:
    """Form fields without the ones left out (None)."""
    return {name: value for name, value in fields.items() if value is not None}


def _number(value: float | None) -> str | None:
    return None if value is None else repr(float(value))


def _integer(value: int | None) -> str | None:
    return None if value is None else str(operator.index(value))


def _header(response, name: str) -> float:
    return float(response.headers.get(name, "nan"))


def _atom_list(atoms: Atoms, what: str) -> str:
    """Atom indices as the comma-separated field the server reads; a string goes as it is."""
    if isinstance(atoms, str):
        return atoms.strip()
    try:
        return ",".join(str(operator.index(atom)) for atom in atoms)
    except TypeError:
        raise TypeError(f"{what} must be atom indices (integers) or a list such as '3,40-43', got {atoms!r}") from None


def _service_error(route: str, response) -> ServiceError:
    """The server's one-line ``error`` (or, from something else on the way, the first line of its body)."""
    detail = None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        message, detail = body["error"], body.get("detail")
    else:
        lines = [line.strip() for line in response.text.splitlines() if line.strip()]
        message = lines[0][:300] if lines else (response.reason_phrase or f"HTTP {response.status_code}")
    return ServiceError(response.status_code, message, route, detail)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
