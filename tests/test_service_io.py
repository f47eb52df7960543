"""Request codecs of the service: images and .npy in, PNG out, the sparse code format; bad input refused."""

import io
import struct
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from csc_serve.service.codes import read_codes, to_sparse
from csc_serve.service.payloads import RequestError, image_array, png_bytes, read_image, read_npy

CAP = 1 << 20


def encoded(array_hwc: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array_hwc).save(out, format=fmt, **options)
    return out.getvalue()


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=allow_pickle)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR declaring the size, then an empty IDAT and IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture
def rgb():
    return np.random.default_rng(0).integers(0, 256, (13, 17, 3), dtype=np.uint8)


def test_png_reads_as_exact_floats_in_channel_first_order(rgb):
    image = read_image(encoded(rgb), channels=3, max_pixels=CAP)
    assert image.shape == (3, 13, 17) and image.dtype == np.float32
    np.testing.assert_array_equal(image, rgb.transpose(2, 0, 1) / np.float32(255))


def test_grey_and_alpha_images_follow_the_training_conversion(rgb):
    grey = read_image(encoded(rgb), channels=1, max_pixels=CAP)
    luma = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255
    np.testing.assert_allclose(grey[0], luma, atol=1e-5)
    rgba = np.dstack([rgb, np.zeros((13, 17), np.uint8)])  # fully transparent: white after compositing
    np.testing.assert_array_equal(read_image(encoded(rgba), channels=3, max_pixels=CAP), 1.0)


def test_jpeg_webp_bmp_and_16_bit_png_are_read():
    y, x = np.mgrid[0:24, 0:32]
    smooth = np.stack([8 * x, 10 * y, 4 * (x + y)], axis=-1).astype(np.uint8)  # lossy codecs keep gradients
    for fmt, tolerance in (("BMP", 1e-6), ("JPEG", 0.02), ("WEBP", 0.02)):
        image = read_image(encoded(smooth, fmt, **({"quality": 95} if fmt != "BMP" else {})), 3, CAP)
        assert image.shape == (3, 24, 32)
        assert np.abs(image - smooth.transpose(2, 0, 1) / 255).mean() <= tolerance, fmt
    deep = (np.arange(13 * 17, dtype=np.uint16).reshape(13, 17) * 300)
    image = read_image(encoded(deep), channels=1, max_pixels=CAP)
    np.testing.assert_allclose(image[0], deep / 65535, atol=1e-6)


def test_npy_arrays_keep_their_floats_including_noisy_values_beyond_0_1():
    array = np.random.default_rng(1).normal(0.5, 0.3, (3, 9, 11)).astype(np.float64)
    image = read_image(npy(array), channels=3, max_pixels=CAP)
    assert image.dtype == np.float32 and image.min() < 0 and image.max() > 1
    np.testing.assert_array_equal(image, array.astype(np.float32))
    np.testing.assert_array_equal(read_image(npy(array[None]), 3, CAP), image)  # (1, C, H, W)
    fortran = np.asfortranarray(array)
    np.testing.assert_array_equal(read_image(npy(fortran), 3, CAP), image)


def test_png_bytes_round_trips_within_8_bit_quantisation():
    image = np.random.default_rng(2).random((3, 10, 12), dtype=np.float32)
    back = read_image(png_bytes(image), channels=3, max_pixels=CAP)
    assert np.abs(back - image).max() <= 0.5 / 255 + 1e-6
    clipped = read_image(png_bytes(image * 3 - 1), channels=3, max_pixels=CAP)
    assert clipped.min() == 0 and clipped.max() == 1


def _truncated_png(rgb):
    data = encoded(rgb)
    return data[: len(data) // 2]


BAD_IMAGES = [
    ("empty", lambda rgb: b"", 400, "empty"),
    ("text", lambda rgb: b"hello, this is not an image" * 10, 400, "not an image file"),
    ("truncated-png", _truncated_png, 400, "cannot decode"),
    ("zero-pixel-png", lambda rgb: png_header_only(0, 0), 400, ""),
    ("bomb", lambda rgb: encoded(np.zeros((3000, 3000), np.uint8)), 413, "exceed the cap"),
    ("huge-header", lambda rgb: png_header_only(100_000, 100_000), 413, ""),
    ("object-npy", lambda rgb: npy(np.array([{"a": 1}], dtype=object), allow_pickle=True), 400, "not accepted"),
    ("int-npy", lambda rgb: npy(np.zeros((3, 4, 4), np.int32)), 400, "not accepted"),
    ("truncated-npy", lambda rgb: npy(np.zeros((3, 8, 8), np.float32))[:-10], 400, "truncated"),
    ("nan-npy", lambda rgb: npy(np.full((3, 4, 4), np.nan, np.float32)), 400, "NaN or Inf"),
    ("inf-npy", lambda rgb: npy(np.full((3, 4, 4), np.inf, np.float32)), 400, "NaN or Inf"),
    ("far-out-of-range-npy", lambda rgb: npy(np.full((3, 4, 4), 7.0, np.float32)), 400, "values must lie"),
    ("wrong-channels-npy", lambda rgb: npy(np.zeros((4, 4, 4), np.float32)), 400, "is not (3, H, W)"),
    ("zero-pixel-npy", lambda rgb: npy(np.zeros((3, 0, 5), np.float32)), 400, "no pixels"),
]


@pytest.mark.parametrize("make,status,message", [case[1:] for case in BAD_IMAGES], ids=[c[0] for c in BAD_IMAGES])
def test_bad_images_are_refused_with_a_status_and_one_line(rgb, make, status, message):
    with pytest.raises(RequestError) as caught:
        read_image(make(rgb), channels=3, max_pixels=CAP)
    assert caught.value.status == status
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_an_npy_header_claiming_a_huge_array_is_refused_before_allocation():
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 200000, 200000), }"
    data = b"\x93NUMPY\x01\x00" + struct.pack("<H", 118) + header.ljust(117).encode() + b"\n"
    with pytest.raises(RequestError) as caught:
        read_npy(data + b"\x00" * 64, "image", max_values=CAP)
    assert caught.value.status == 413
    with pytest.raises(RequestError, match="truncated"):
        read_npy(data + b"\x00" * 64, "image")  # no cap: the body still has to match the header


def test_image_array_refuses_more_pixels_than_the_cap():
    with pytest.raises(RequestError) as caught:
        image_array(np.zeros((3, 100, 100), np.float32), 3, max_pixels=9_999, value_range=(0.0, 1.0))
    assert caught.value.status == 413


# ----------------------------------------------------------------------------- the sparse code format
def sparse_codes(seed=0, shape=(6, 9, 11), density=0.2):
    rng = np.random.default_rng(seed)
    codes = rng.normal(size=shape).astype(np.float32)
    codes[rng.random(shape) > density] = 0
    return codes


def test_sparse_codes_are_read_back_with_numpy_alone():
    codes = sparse_codes()
    data = to_sparse(codes, (17, 21), [0.5, 0.8], 2.5)
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
        assert f["indices"].dtype == np.int32 and f["values"].dtype == np.float32
        assert (np.diff(f["indices"]) > 0).all()
        dense = np.zeros(np.prod(f["shape"]), np.float32)
        dense[f["indices"]] = f["values"]
        np.testing.assert_array_equal(dense.reshape(f["shape"]), codes)
        assert tuple(f["image_size"]) == (17, 21) and f["sparsity"].tolist() == [0.5, 0.8]
        assert float(f["lmbda_scale"]) == 2.5


def test_sparse_codes_round_trip_and_are_smaller_than_dense_when_sparse():
    codes = sparse_codes(shape=(20, 30, 30), density=0.1)
    data = to_sparse(codes, (60, 60), [0.9], 1.0)
    back, size = read_codes(data, code_channels=20, max_values=CAP)
    np.testing.assert_array_equal(back, codes)
    assert size == (60, 60)
    assert len(data) < codes.nbytes / 4  # 10 % non-zero: 8 bytes each
    half = to_sparse(codes, (60, 60), [0.9], 1.0, value_dtype="float16")
    assert len(half) < len(data)
    back16, _ = read_codes(half, code_channels=20, max_values=CAP)
    np.testing.assert_allclose(back16, codes, rtol=1e-3, atol=1e-4)  # float16 keeps 11 bits


def test_dense_npy_codes_are_accepted():
    codes = sparse_codes()
    back, size = read_codes(npy(codes[None]), code_channels=6, max_values=CAP)
    np.testing.assert_array_equal(back, codes)
    assert size is None


def _archive(**arrays) -> bytes:
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def _valid(**changes):
    arrays = {"shape": np.array([6, 9, 11]), "indices": np.array([0, 5, 7], np.int32),
              "values": np.array([1.0, -2.0, 0.5], np.float32)}
    arrays.update(changes)
    return _archive(**{k: v for k, v in arrays.items() if v is not None})


def _zip_bomb() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("values.npy", b"\x00" * (64 << 20))
    return out.getvalue()


BAD_CODES = [
    ("garbage", b"PK\x03\x04 not really a zip", 400, "not a readable .npz"),
    ("wrong-channels", _valid(shape=np.array([5, 9, 11])), 400, "is not (6, h, w)"),
    ("wrong-dtype", npy(np.zeros((6, 4, 4), np.int64)), 400, "not accepted"),
    ("dense-wrong-shape", npy(np.zeros((6, 4), np.float32)), 400, "is not (6, h, w)"),
    ("index-out-of-range", _valid(indices=np.array([0, 5, 6 * 9 * 11], np.int32)), 400, "must lie in"),
    ("unsorted-indices", _valid(indices=np.array([5, 0, 7], np.int32)), 400, "strictly increasing"),
    ("length-mismatch", _valid(values=np.array([1.0], np.float32)), 400, "same length"),
    ("nan-values", _valid(values=np.array([1.0, np.nan, 0.5], np.float32)), 400, "NaN or Inf"),
    ("inf-dense", npy(np.full((6, 2, 2), np.inf, np.float32)), 400, "NaN or Inf"),
    ("missing-values", _valid(values=None), 400, "lacks values"),
    ("unexpected-member", _archive(shape=np.array([6, 1, 1]), indices=np.array([0]), values=np.array([1.0]),
                                   payload=np.zeros(3)), 400, "unexpected member"),
    ("zip-bomb", _zip_bomb(), 413, "inflates"),
    ("too-many-codes", _valid(shape=np.array([6, 1 << 12, 1 << 12])), 413, "exceed the cap"),
]


@pytest.mark.parametrize("data,status,message", [c[1:] for c in BAD_CODES], ids=[c[0] for c in BAD_CODES])
def test_bad_codes_are_refused_with_a_status_and_one_line(data, status, message):
    with pytest.raises(RequestError) as caught:
        read_codes(data, code_channels=6, max_values=CAP)
    assert caught.value.status == status
    assert message in str(caught.value) and "\n" not in str(caught.value)
