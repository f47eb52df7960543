"""The sparse code format of ``/encode`` and ``/decode``: a NumPy ``.npz`` archive, readable with numpy alone.

Arrays in the archive (written by ``numpy.savez``, entries stored; ``/decode`` also takes archives written by
``numpy.savez_compressed``; read them with ``numpy.load(path, allow_pickle=False)``)::

    shape       int64 (3,)      (K, h, w): code maps, height and width of the last-stage codes
    indices     int32 (N,)      flat C-order positions of the non-zero codes in (K, h, w), strictly
                                increasing (int64 when K*h*w >= 2**31)
    values      float32 (N,)    the non-zero codes, in the same order (float16 on request)
    image_size  int64 (2,)      (H, W) of the image the codes describe: decode crops to it
    sparsity    float64 (L,)    fraction of zero codes per encoder stage, first to last (only the
                                last stage's when the earlier stages were not measured)
    lmbda_scale float32 ()      the threshold scale the codes were computed with

Dense codes back, with numpy alone::

    with np.load("codes.npz", allow_pickle=False) as f:
        codes = np.zeros(np.prod(f["shape"]), np.float32)
        codes[f["indices"]] = f["values"]
        codes = codes.reshape(f["shape"])

Why it is compact: a dense float32 map costs 4 bytes per code; this format costs 8 bytes per non-zero
code (6 with float16 values), so it is smaller as soon as fewer than half the codes are non-zero. The
entries are not deflated: the values do not compress (their mantissas are noise), and deflating the
archive of a 256x256 image's codes took 76 ms, more than the 43 ms its encode takes on ONNX Runtime, to
save 36% of 1.1 MB; storing it takes 3 ms.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np

from csc_serve.service.payloads import RequestError, check_finite, read_npy

REQUIRED = ("shape", "indices", "values")
OPTIONAL = ("image_size", "sparsity", "lmbda_scale")
VALUE_DTYPES = ("float32", "float16")
ZIP_MAGIC = b"PK\x03\x04"


def to_sparse(codes: np.ndarray, image_size: tuple[int, int], sparsity: list[float], lmbda_scale: float,
              value_dtype: str = "float32") -> bytes:
    """``(K, h, w)`` codes as the ``.npz`` bytes described above."""
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value_dtype must be one of {VALUE_DTYPES}, got {value_dtype!r}")
    flat = codes.reshape(-1)
    index_dtype = np.int32 if flat.size < 2**31 else np.int64
    indices = np.flatnonzero(flat != 0).astype(index_dtype)  # on the mask: a sixth of the time on the floats
    out = io.BytesIO()
    np.savez(
        out,
        shape=np.array(codes.shape, np.int64),
        indices=indices,
        values=np.take(flat, indices).astype(value_dtype, copy=False),
        image_size=np.array(image_size, np.int64),
        sparsity=np.array(sparsity, np.float64),
        lmbda_scale=np.array(lmbda_scale, np.float32),
    )
    return out.getvalue()


def read_codes(data: bytes, code_channels: int, max_values: int) -> tuple[np.ndarray, tuple[int, int] | None]:
    """Codes uploaded as the sparse ``.npz`` or as a dense ``.npy`` ``(K, h, w)`` / ``(1, K, h, w)`` float
    array: float32 ``(K, h, w)`` and the image size recorded with them (``None`` for a dense array)."""
    if not data:
        raise RequestError("codes: the file is empty")
    if data[:4] == ZIP_MAGIC:
        codes, size = _read_sparse(data, max_values)
    else:
        dense = read_npy(data, "codes", kinds="f", max_values=max_values)
        if dense.ndim == 4 and dense.shape[0] == 1:
            dense = dense[0]
        codes, size = dense, None
    if codes.ndim != 3 or codes.shape[0] != code_channels or min(codes.shape) < 1:
        raise RequestError(f"codes: shape {codes.shape} is not ({code_channels}, h, w) with h, w >= 1")
    codes = np.ascontiguousarray(codes, dtype=np.float32)
    check_finite(codes, "codes")
    return codes, size



def _read_sparse(data: bytes, max_values: int) -> tuple[np.ndarray, tuple[int, int] | None]:
    arrays = _read_npz(data, max_values)
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise RequestError(f"codes: sparse archive lacks {', '.join(missing)} (see /docs for the format)")
    shape, indices, values = arrays["shape"], arrays["indices"], arrays["values"]
    if shape.shape != (3,) or shape.dtype.kind not in "iu" or (shape < 1).any():
        raise RequestError(f"codes: 'shape' must be three positive integers (K, h, w), got {shape.tolist()}")
    total = int(np.prod(shape.astype(np.int64)))
    if total > max_values:
        raise RequestError(f"codes: {total} values exceed the cap of {max_values}", status=413)
    if indices.ndim != 1 or indices.dtype.kind not in "iu":
        raise RequestError(f"codes: 'indices' must be a 1-D integer array, got {indices.dtype} {indices.shape}")
    if values.ndim != 1 or values.dtype.kind != "f" or values.shape != indices.shape:
        raise RequestError(f"codes: 'values' must be floats of the same length as 'indices' ({indices.size}), "
                           f"got {values.dtype} {values.shape}")
    check_finite(values, "codes: 'values'")
    if indices.size:
        if indices[0] < 0 or indices[-1] >= total:
            raise RequestError(f"codes: 'indices' must lie in [0, {total}) for shape {tuple(shape.tolist())}")
        if indices.size > 1 and not (np.diff(indices.astype(np.int64)) > 0).all():
            raise RequestError("codes: 'indices' must be strictly increasing")
    dense = np.zeros(total, np.float32)
    dense[indices.astype(np.int64)] = values
    size = None
    if "image_size" in arrays:
        image_size = arrays["image_size"]
        if image_size.shape != (2,) or image_size.dtype.kind not in "iu" or (image_size < 1).any():
            raise RequestError(f"codes: 'image_size' must be two positive integers, got {image_size.tolist()}")
        size = (int(image_size[0]), int(image_size[1]))
    return dense.reshape(tuple(int(v) for v in shape)), size


def _read_npz(data: bytes, max_values: int) -> dict[str, np.ndarray]:
    """The archive's arrays; sizes checked from the zip directory before anything is inflated."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise RequestError(f"codes: not a readable .npz archive ({err})") from None
    known = {f"{k}.npy": k for k in REQUIRED + OPTIONAL}
    arrays = {}
    with archive:
        for member in members:
            name = known.get(member.filename)
            if name is None:
                raise RequestError(f"codes: unexpected member {member.filename!r} in the archive")
            if member.file_size > 16 * max_values + 4096:  # int64 indices plus float64 values, plus a header
                raise RequestError(f"codes: member {member.filename} inflates to {member.file_size} bytes", 413)
            try:
                body = archive.read(member)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError) as err:
                raise RequestError(f"codes: cannot read {member.filename} ({err})") from None
            kinds = "f" if name in ("values", "sparsity", "lmbda_scale") else "iu"
            arrays[name] = read_npy(body, f"codes: {name}", kinds=kinds, max_values=max_values)
    return arrays
