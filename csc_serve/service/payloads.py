"""What the service reads and writes: uploaded images and ``.npy`` arrays in, PNG and ``.npy`` out.

Every reader checks sizes before it allocates or decodes anything, and refuses bad input with a
``RequestError`` carrying an HTTP status and one line of reason:

- images: PNG, JPEG, BMP, TIFF, WebP, GIF, PPM only (Pillow is never asked to guess among its other
  formats); the pixel count comes from the header and is checked against the cap before decoding, which
  stops decompression bombs; truncated files fail on decode.
- ``.npy``: parsed by hand from its header, so no array is allocated before its shape, dtype and the
  body length agree; object dtypes are refused (they would need pickle); ``allow_pickle`` never arises.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")
NPY_MAGIC = b"\x93NUMPY"
# ITU-R 601 luma, as training.data.load_image converts RGB for grey models.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class RequestError(ValueError):
    """Bad request input: ``status`` is the HTTP status to answer with, the message one line of reason."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- .npy
def read_npy(data: bytes | memoryview, what: str, kinds: str = "f", max_values: int | None = None) -> np.ndarray:
    """A ``.npy`` file's array, checked before it is built. ``kinds``: accepted dtype kinds (``f`` float,
    ``i``/``u`` integers). The array is read-only and may share memory with ``data``."""
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buffer)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buffer)
        else:
            raise ValueError(f"format version {version} is not supported")
    except (ValueError, SyntaxError, TypeError, EOFError) as err:
        raise RequestError(f"{what}: not a readable .npy file ({_one_line(err)})") from None
    if dtype.hasobject or dtype.kind not in kinds or dtype.itemsize > 8:
        wanted = {"f": "float", "i": "integer", "u": "unsigned integer"}
        names = " or ".join(wanted[k] for k in kinds)
        raise RequestError(f"{what}: dtype {dtype} is not accepted ({names} arrays only)")
    count = math.prod(shape)
    if max_values is not None and count > max_values:
        raise RequestError(f"{what}: {count} values exceed the cap of {max_values}", status=413)
    offset = buffer.tell()
    expected = offset + count * dtype.itemsize
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "followed by extra bytes"
        raise RequestError(f"{what}: .npy body is {state} ({len(data)} bytes, header implies {expected})")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran else "C")


def npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(array), allow_pickle=False)
    return out.getvalue()


def check_finite(array: np.ndarray, what: str) -> None:
    if not np.isfinite(array).all():
        raise RequestError(f"{what} holds NaN or Inf")


# ----------------------------------------------------------------------------- images
def read_image(data: bytes, channels: int, max_pixels: int, value_range: tuple[float, float] = (0.0, 1.0),
               what: str = "image") -> np.ndarray:
    """An uploaded image file or ``.npy`` array as float32 ``(C, H, W)`` with the model's channel count.

    8-bit and 16-bit images map to [0, 1] (palette and alpha flattened onto white, EXIF orientation
    applied, grey replicated to RGB, RGB to luma for grey models, as in training). A ``.npy`` array is taken
    as is: ``(C, H, W)``, ``(1, C, H, W)``, or ``(H, W)`` for grey models; floats, finite, within the value
    range widened by its own width on each side (noisy inputs leave it).
    """
    if not data:
        raise RequestError(f"{what}: the file is empty")
    if data[: len(NPY_MAGIC)] == NPY_MAGIC:
        return image_array(read_npy(data, what), channels, max_pixels, value_range, what)
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            _check_pixels(height, width, max_pixels, what)
            image = ImageOps.exif_transpose(image)
            array = _to_float(image)
    except RequestError:
        raise
    except UnidentifiedImageError:
        names = ", ".join(IMAGE_FORMATS)
        raise RequestError(f"{what}: not an image file this service reads ({names}, or a .npy array)") from None
    except Image.DecompressionBombError as err:
        raise RequestError(f"{what}: {_one_line(err)}", status=413) from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as err:
        raise RequestError(f"{what}: cannot decode the image ({_one_line(err)})") from None
    return _with_channels(array, channels)


def _to_float(image: Image.Image) -> np.ndarray:
    from csc_serve.models.images import to_float  # one conversion for training and serving

    return to_float(image)


def _with_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) or (H, W, C) floats -> (channels, H, W)."""
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    if array.shape[0] != channels:
        array = np.repeat(array, 3, axis=0) if channels == 3 else np.tensordot(LUMA, array, axes=1)[None]
    return np.ascontiguousarray(array, dtype=np.float32)


def _check_pixels(height: int, width: int, max_pixels: int, what: str) -> None:
    if height < 1 or width < 1:
        raise RequestError(f"{what}: the image has no pixels ({height}x{width})")
    if height * width > max_pixels:
        raise RequestError(f"{what}: {height}x{width} = {height * width} pixels exceed the cap of {max_pixels}",
                           status=413)


def image_array(array: np.ndarray, channels: int, max_pixels: int, value_range: tuple[float, float],
                what: str = "image") -> np.ndarray:
    """A float array as the model's ``(C, H, W)`` float32 image, or ``RequestError``."""
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2 and channels == 1:
        array = array[None]
    if array.ndim != 3 or array.shape[0] != channels:
        grey = " or (H, W)" if channels == 1 else ""
        raise RequestError(f"{what}: array of shape {array.shape} is not ({channels}, H, W){grey}")
    _check_pixels(array.shape[1], array.shape[2], max_pixels, what)
    array = np.ascontiguousarray(array, dtype=np.float32)
    check_finite(array, what)
    low, high = value_range
    margin = high - low
    if array.min() < low - margin or array.max() > high + margin:
        raise RequestError(f"{what}: values must lie in [{low:g}, {high:g}] (noisy inputs within "
                           f"[{low - margin:g}, {high + margin:g}]), got [{array.min():.3g}, {array.max():.3g}]")
    return array


def png_bytes(image: np.ndarray, value_range: tuple[float, float] = (0.0, 1.0)) -> bytes:
    """A ``(C, H, W)`` float image as an 8-bit PNG (clipped to the value range, rounded)."""
    low, high = value_range
    scaled = np.clip((image - low) / (high - low), 0.0, 1.0) * 255.0
    pixels = np.rint(scaled).astype(np.uint8)
    pixels = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
    out = io.BytesIO()
    # Level 1: several times faster than the default 6, and these images barely compress further.
    Image.fromarray(np.ascontiguousarray(pixels)).save(out, format="PNG", compress_level=1)
    return out.getvalue()


# ----------------------------------------------------------------------------- atom lists
def read_atom_list(text: str | None, num_atoms: int, what: str, limit: int | None = None) -> np.ndarray | None:
    """A list of last-stage atoms such as ``"3,17,40-43"`` as sorted unique int64 indices, ``None`` when the
    field is absent or blank; ``RequestError`` for a malformed list, an index out of range or over ``limit``."""
    from csc_serve.models.explain import parse_atoms

    if text is None or not text.strip():
        return None
    try:
        return parse_atoms(text, num_atoms, limit)
    except ValueError as err:
        raise RequestError(f"{what}: {_one_line(err)}") from None


def read_keep_or_drop(keep: str | None, drop: str | None, num_atoms: int) -> np.ndarray | None:
    """The float32 ``(K,)`` mask of ``/decode``'s ``keep`` or ``drop`` list (1: the atom stays), ``None`` when
    neither is given; ``RequestError`` for a bad list or both."""
    from csc_serve.models.explain import atom_mask

    kept, dropped = read_atom_list(keep, num_atoms, "keep"), read_atom_list(drop, num_atoms, "drop")
    if kept is not None and dropped is not None:
        raise RequestError("give keep or drop, not both")
    if kept is None and dropped is None:
        return None
    return atom_mask(kept, num_atoms) if dropped is None else atom_mask(dropped, num_atoms, keep=False)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
