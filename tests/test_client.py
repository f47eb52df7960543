"""``csc_serve.client.Client`` against a real ``bentoml serve``: the server of tests/test_service_http.py (its
fixtures and helpers), and a second one that requires a bearer token.

Each answer is checked against the server's raw HTTP answer to the same request, or against the same exported
graphs run in this process.
"""

import io
import socket

import numpy as np
import pytest
from PIL import Image

from csc_serve.client import (
    Client,
    ClientError,
    Denoised,
    Explanation,
    Reconstruction,
    ServiceError,
    ServiceTimeout,
    ServiceUnreachable,
    SparseCodes,
)
from csc_serve.service.process import ServerProcess, free_port
from tests import test_service_http as http
from tests.test_service_http import ROOT, SAME_TOL, K, as_array, image, npy, png, post

# The module-scoped server of tests/test_service_http.py (a server of this module's own, started the same way),
# and the exported graphs it serves, loaded in this process.
server, backend, monkeypatch_module = http.server, http.backend, http.monkeypatch_module

TOKEN = "client-test-token"


@pytest.fixture(scope="module")
def client(server):
    with Client(server.url, timeout=60) as opened:
        yield opened


@pytest.fixture(scope="module")
def guarded(server, tmp_path_factory):
    """A second server that requires ``TOKEN``, on the graphs the first one exported."""
    env = {"CSC_CACHE_DIR": str(server.cache), "BENTOML_HOME": str(tmp_path_factory.mktemp("guarded")),
           "CSC_SERVE_TOKEN": TOKEN}
    with ServerProcess(env=env, cwd=ROOT, target=None, timeout=240) as running:
        yield running


def noisy(height=40, width=56, seed=0) -> np.ndarray:
    x = image(height, width, seed)
    x[0, 0, 0], x[2, 3, 4] = -0.15, 1.2  # noisy images leave [0, 1]: floats go through unclipped
    return x


def raw_npz(server, route, files, data) -> dict:
    reply = post(server, route, files=files, data=data)
    assert reply.status_code == 200, reply.text
    with np.load(io.BytesIO(reply.content), allow_pickle=False) as f:
        return {name: f[name] for name in f.files}


# ----------------------------------------------------------------------------- the endpoints
def test_encode_gives_dense_or_sparse_codes_equal_to_the_raw_answer(client, server, backend):
    x = noisy()
    dense = client.encode(x)
    raw = as_array(post(server, "/encode", files={"image": ("x.npy", npy(x))}, data={"output": "npy"}))
    assert dense.dtype == np.float32 and dense.shape == (K, 10, 14)  # stride 4: 40x56 -> 10x14
    np.testing.assert_array_equal(dense, raw)
    np.testing.assert_allclose(dense, backend.encode(x[None], 1.0)[0], atol=SAME_TOL, rtol=0)

    sparse = client.encode(x, lmbda_scale=2.0, sparse=True)
    assert isinstance(sparse, SparseCodes)
    assert sparse.shape == (K, 10, 14) and sparse.image_size == (40, 56) and sparse.lmbda_scale == 2.0
    assert len(sparse.sparsity) == 2 and sparse.indices.size == np.count_nonzero(sparse.dense())
    np.testing.assert_allclose(sparse.dense(), backend.encode(x[None], 2.0)[0], atol=SAME_TOL, rtol=0)
    again = SparseCodes.from_npz(sparse.to_npz())
    assert again.shape == sparse.shape and again.sparsity == sparse.sparsity
    np.testing.assert_array_equal(again.dense(), sparse.dense())


def test_decode_takes_sparse_codes_dense_arrays_and_code_files(client, backend, tmp_path):
    source = tmp_path / "noisy.png"
    source.write_bytes(png(image(40, 56, seed=3)))
    codes = client.encode(source, sparse=True)
    expected = backend.decode(codes.dense()[None], output_size=(40, 56))[0]
    from_sparse = client.decode(codes)
    assert from_sparse.dtype == np.float32 and from_sparse.shape == (3, 40, 56)
    np.testing.assert_allclose(from_sparse, expected, atol=SAME_TOL, rtol=0)
    # Dense codes carry no image size: the whole 10x14 grid, unless cropped.
    np.testing.assert_allclose(client.decode(codes.dense(), height=40, width=56), expected, atol=SAME_TOL, rtol=0)
    assert client.decode(codes.dense()).shape == (3, 40, 56)
    assert client.decode(codes, height=37, width=53).shape == (3, 37, 53)  # within the last stride
    (tmp_path / "codes.npz").write_bytes(codes.to_npz())
    np.testing.assert_array_equal(client.decode(tmp_path / "codes.npz"), from_sparse)


def test_reconstruct_and_denoise_return_the_image_and_the_figures_of_the_headers(client, server, backend):
    x = noisy(seed=1)
    result = client.reconstruct(x, lmbda_scale=2.0)
    raw = post(server, "/reconstruct", files={"image": ("x.npy", npy(x))}, data={"lmbda_scale": "2", "output": "npy"})
    assert isinstance(result, Reconstruction) and result.image.dtype == np.float32
    np.testing.assert_array_equal(result.image, as_array(raw))
    np.testing.assert_allclose(result.image, backend.reconstruct(x[None], 2.0)[0], atol=SAME_TOL, rtol=0)
    assert result.psnr == float(raw.headers["x-csc-psnr"]) and result.lmbda_scale == 2.0
    assert result.sparsity == float(raw.headers["x-csc-sparsity"]) and 0 < result.sparsity < 1

    given = client.denoise(x, sigma=25)
    assert isinstance(given, Denoised) and (given.sigma, given.sigma_source) == (25.0, "given")
    assert given.lmbda_scale > 1
    # The noise level reaches the thresholds of a noise-adaptive model (the bundled one) too.
    np.testing.assert_allclose(given.image, backend.reconstruct(x[None], given.lmbda_scale, sigma=25)[0],
                               atol=SAME_TOL, rtol=0)
    blind = client.denoise(x)
    assert blind.sigma_source == "estimated" and blind.sigma > 0
    scaled = client.denoise(x, lmbda_scale=3.0)
    assert (scaled.sigma, scaled.sigma_source, scaled.lmbda_scale) == (None, "none", 3.0)


def test_png_files_their_bytes_and_uint8_pixels_give_the_same_answer(client, tmp_path):
    pixels = (np.clip(image(24, 32, seed=4), 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
    path = tmp_path / "rgb.png"
    Image.fromarray(pixels).save(path)
    expected = client.reconstruct(pixels.transpose(2, 0, 1) / np.float32(255)).image
    for given in (path, str(path), path.read_bytes(), pixels, np.dstack([pixels, np.full((24, 32), 255, np.uint8)])):
        np.testing.assert_array_equal(client.reconstruct(given).image, expected)


def test_grey_images_are_replicated_to_the_models_channels_as_the_server_does_for_files(client, tmp_path):
    grey = (np.linspace(0, 1, 24 * 32).reshape(24, 32) * 255).round().astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    expected = client.reconstruct(tmp_path / "grey.png").image
    assert expected.shape == (3, 24, 32)
    for given in (grey, grey[..., None], grey / np.float32(255)):
        np.testing.assert_array_equal(client.reconstruct(given).image, expected)


def test_metadata_names_the_served_model(client):
    meta = client.metadata()
    assert meta["ready"] is True and meta["model"]["reference"] == "csc-ctrl-rgb"


# ----------------------------------------------------------------------------- the interpretability endpoints
def test_atoms_equal_the_raw_answer_for_the_last_and_a_named_stage(client, server):
    last = client.atoms()
    raw = post(server, "/atoms", json={"output": "npy"})
    assert last.dtype == np.float32 and last.ndim == 4 and last.shape[:2] == (K, 3)
    np.testing.assert_array_equal(last, as_array(raw))
    first = client.atoms(stage=0)
    stage = client.metadata()["model"]["config"]["stages"][0]
    assert first.shape == (stage["num_atoms"], 3, stage["kernel_size"], stage["kernel_size"])
    assert not np.array_equal(first, last)
    np.testing.assert_array_equal(first, as_array(post(server, "/atoms", json={"stage": 0, "output": "npy"})))
    with pytest.raises(ServiceError) as caught:
        client.atoms(stage=7)
    assert caught.value.status == 400


def test_decode_keep_and_drop_zero_the_codes_of_the_other_atoms(client, server):
    codes = client.encode(noisy(seed=5), sparse=True)
    dense = codes.dense()
    chosen = [int(k) for k in np.argsort(-np.abs(dense).sum(axis=(1, 2)))[:5]]
    only = np.zeros_like(dense)
    only[chosen] = dense[chosen]
    kept = client.decode(codes, keep=chosen)
    np.testing.assert_allclose(kept, client.decode(only, height=40, width=56), atol=SAME_TOL, rtol=0)
    raw = post(server, "/decode", files={"codes": ("c.npz", codes.to_npz())},
               data={"keep": ",".join(map(str, chosen)), "output": "npy"})
    np.testing.assert_array_equal(kept, as_array(raw))
    assert raw.headers["x-csc-atoms-kept"] == "5"
    dropped = client.decode(codes, drop=np.array(chosen))
    np.testing.assert_allclose(dropped, client.decode(dense - only, height=40, width=56), atol=SAME_TOL, rtol=0)
    np.testing.assert_array_equal(client.decode(codes, drop=[]), client.decode(codes))
    with pytest.raises(ValueError, match="not both"):
        client.decode(codes, keep=[1], drop=[2])
    with pytest.raises(ServiceError) as caught:
        client.decode(codes, keep=[K])
    assert caught.value.status == 400


def test_explain_reads_every_field_of_the_archive(client, server):
    x = noisy(seed=6)
    result = client.explain(x, atoms=[40, 3, 17], top=5)
    raw = raw_npz(server, "/explain", {"image": ("x.npy", npy(x))}, {"atoms": "3,17,40", "top": "5"})
    assert isinstance(result, Explanation)
    for name in ("energy", "top", "atoms", "activations", "contributions", "base", "reconstruction", "partial",
                 "without"):
        np.testing.assert_array_equal(getattr(result, name), raw[name], err_msg=name)
    assert result.atoms.tolist() == [3, 17, 40] and result.top.shape == (5,)
    assert result.lmbda_scale == 1.0 and result.sigma is None and result.image_size == (40, 56)
    assert result.contributions.shape == (3, 3, 40, 56) and result.activations.shape == (3, 10, 14)
    np.testing.assert_allclose(result.activations, client.encode(x)[[3, 17, 40]], atol=SAME_TOL, rtol=0)
    np.testing.assert_allclose(result.reconstruction, client.reconstruct(x).image, atol=SAME_TOL, rtol=0)
    np.testing.assert_allclose(result.partial, result.base + result.contributions.sum(0), atol=SAME_TOL, rtol=0)
    assert np.isfinite(result.psnr) and 0 < result.sparsity < 1
    denoising = client.explain(x, sigma=25)
    assert denoising.sigma == 25.0 and denoising.lmbda_scale > 1
    assert denoising.atoms.tolist() == sorted(denoising.top.tolist()) and denoising.top.size == 16  # the default
    with pytest.raises(ServiceError) as caught:
        client.explain(x, atoms=range(65))
    assert caught.value.status == 400 and caught.value.message


# ----------------------------------------------------------------------------- errors, tokens, connections
def test_a_4xx_surfaces_as_service_error_with_the_servers_one_line_message(client, server):
    x = noisy(seed=7)
    raw = post(server, "/reconstruct", files={"image": ("x.npy", npy(x))}, data={"lmbda_scale": "1000"})
    with pytest.raises(ServiceError) as caught:
        client.reconstruct(x, lmbda_scale=1000)
    assert (caught.value.status, caught.value.route) == (400, "/reconstruct")
    assert caught.value.message == raw.json()["error"] and caught.value.message in str(caught.value)
    with pytest.raises(ServiceError, match="is not") as caught:
        client.decode(np.zeros((74, 4, 4), np.float32))
    assert caught.value.status == 400 and "\n" not in caught.value.message
    with pytest.raises(ServiceError) as caught:
        client.reconstruct(b"plain text, not an image " * 20)
    assert caught.value.status == 400 and isinstance(caught.value, ClientError)


BAD_IMAGES = [
    ("int-array", np.zeros((3, 8, 8), np.int64), TypeError),
    ("uint8-channel-first", np.zeros((3, 8, 8), np.uint8), ValueError),
    ("float-1d", np.zeros(8, np.float32), ValueError),
    ("list", [[0.0, 1.0]], TypeError),
]


@pytest.mark.parametrize("given,error", [c[1:] for c in BAD_IMAGES], ids=[c[0] for c in BAD_IMAGES])
def test_images_the_client_cannot_send_are_refused_before_any_request(given, error):
    with Client(f"http://127.0.0.1:{free_port()}") as nowhere:  # a request would raise ServiceUnreachable
        with pytest.raises(error):
            nowhere.reconstruct(given)
        with pytest.raises(TypeError):
            nowhere.decode(np.zeros((96, 4, 4), np.float32), keep=3)


def test_the_bearer_token_is_sent_when_given(guarded):
    x = noisy(24, 24, seed=8)
    with Client(guarded.url, token=TOKEN) as authorized:
        assert authorized.reconstruct(x).image.shape == (3, 24, 24)
        assert "<set>" in repr(authorized) and TOKEN not in repr(authorized)
    for token in (None, "not-the-token"):
        with Client(guarded.url, token=token) as other, pytest.raises(ServiceError) as caught:
            other.reconstruct(x)
        raw = post(guarded, "/reconstruct", files={"image": ("x.npy", npy(x))})
        assert caught.value.status == raw.status_code == 401 and caught.value.message == raw.json()["error"]


def test_an_unreachable_server_raises_service_unreachable():
    with Client(f"http://127.0.0.1:{free_port()}", timeout=5) as nowhere:
        with pytest.raises(ServiceUnreachable, match="cannot reach") as caught:
            nowhere.metadata()
    assert isinstance(caught.value, ConnectionError) and isinstance(caught.value, ClientError)
    with pytest.raises(ValueError, match="url must be"):
        Client("localhost:3000")


def test_a_server_that_never_answers_raises_service_timeout():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # connections complete in the backlog; nothing ever reads or answers
        with Client(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5) as slow:
            with pytest.raises(ServiceTimeout) as caught:
                slow.metadata()
    assert isinstance(caught.value, TimeoutError)


def test_a_closed_client_refuses_requests(server):
    with Client(server.url) as opened:
        assert opened.metadata()["ready"] is True
    with pytest.raises(ClientError, match="closed"):
        opened.metadata()
