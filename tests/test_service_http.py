"""The service as users meet it: a real ``bentoml serve`` from the repository root, over HTTP.

One server for the module: the bundled model on the default backend, with small limits so that tiling,
the pixel cap and the body cap are cheap to reach. It is hit with ``bentoml.SyncHTTPClient``, with plain
multipart requests, and with the README's examples as written.
"""

import io
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
from PIL import Image

from csc_serve.backends import load_backend
from csc_serve.models.serialization import read_config
from csc_serve.service.process import ServerProcess
from csc_serve.service.tiling import TILE_TOLERANCE

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"CSC_TILE_SIZE": "64", "CSC_MAX_PIXELS": str(300 * 300), "CSC_MAX_BODY_BYTES": str(2 << 20),
          "CSC_BATCH_WAIT_MS": "30"}
# The server and this process run the same exported graphs; batching, tiling and process boundaries may only
# reorder float32 sums.
SAME_TOL = 1e-5
# Atoms of the bundled model's last stage: the channels of its codes.
K = read_config(ROOT / "models" / "pretrained" / "csc-ctrl-rgb")[0].code_channels


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("serve")
    env = {"CSC_CACHE_DIR": str(home / "cache"), "BENTOML_HOME": str(home / "bentoml"), **LIMITS}
    with ServerProcess(env=env, cwd=ROOT, target=None, timeout=240) as running:  # no target: bentofile.yaml
        running.cache = home / "cache"
        yield running


@pytest.fixture(scope="module")
def backend(server, monkeypatch_module):
    monkeypatch_module.setenv("CSC_CACHE_DIR", str(server.cache))  # the graphs the server exported
    return load_backend("csc-ctrl-rgb", "onnxruntime")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def image(height, width, seed=0):
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    clean = np.stack([0.3 + 0.5 * x, 0.2 + 0.6 * y, 0.5 + 0.3 * x * y])
    return (clean + np.random.default_rng(seed).normal(0, 0.08, clean.shape)).astype(np.float32)


def npy(array) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def png(array) -> bytes:
    out = io.BytesIO()
    Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)).save(out, "PNG")
    return out.getvalue()


def post(server, route, timeout=60, **kwargs) -> httpx.Response:
    return httpx.post(server.url + route, timeout=timeout, **kwargs)


def as_array(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content), allow_pickle=False)


# ----------------------------------------------------------------------------- the endpoints
def test_bentoml_client_encodes_decodes_reconstructs_and_denoises(server, backend, tmp_path):
    source = tmp_path / "noisy.png"
    source.write_bytes(png(image(40, 56)))
    with bentoml.SyncHTTPClient(server.url, timeout=60) as client:
        denoised = client.denoise(image=source, sigma=20.0)
        assert Image.open(denoised).size == (56, 40)
        codes = client.encode(image=source, lmbda_scale=2.0)
        with np.load(codes, allow_pickle=False) as f:
            # K atoms on a stride-4 grid: 40x56 pixels give 10x14 code positions.
            assert tuple(f["shape"]) == (K, 10, 14) and tuple(f["image_size"]) == (40, 56)
            assert f["sparsity"].shape == (2,) and float(f["lmbda_scale"]) == 2.0
            assert f["indices"].size < K * 10 * 14 / 2  # sparse codes: the format pays off
            dense = np.zeros(K * 10 * 14, np.float32)
            dense[f["indices"]] = f["values"]
        decoded = client.decode(codes=codes)
        reconstructed = client.reconstruct(image=source, lmbda_scale=2.0)
        a, b = (np.asarray(Image.open(p), dtype=int) for p in (decoded, reconstructed))
        x = np.asarray(Image.open(source), dtype=np.float32).transpose(2, 0, 1)[None] / 255
        # decode is the synthesis of the codes; reconstruct averages that over the 16 shifts of the grid.
        plain = backend.decode(dense.reshape(1, K, 10, 14), output_size=(40, 56))[0]
        assert a.shape == (40, 56, 3) and np.abs(a - np.clip(plain, 0, 1).transpose(1, 2, 0) * 255).max() <= 1
        averaged = backend.reconstruct(x, 2.0)[0]
        assert np.abs(b - np.clip(averaged, 0, 1).transpose(1, 2, 0) * 255).max() <= 1
        meta = client.metadata()
    assert meta["model"]["reference"] == "csc-ctrl-rgb" and meta["backend"]["backend"] == "onnxruntime"
    assert set(meta["artifacts"]["onnx"]) >= {"encode", "decode", "reconstruct"}


def test_float_arrays_go_through_unrounded_and_match_the_backend(server, backend):
    x = image(33, 47, seed=1)
    x[0, 0, 0], x[1, 5, 5] = -0.2, 1.3  # noisy benchmark images leave [0, 1]
    reply = post(server, "/denoise", files={"image": ("x.npy", npy(x))}, data={"sigma": "25", "output": "npy"})
    scale = float(reply.headers["x-csc-lmbda-scale"])
    assert reply.headers["x-csc-sigma"] == "25" and scale > 1
    np.testing.assert_allclose(as_array(reply), backend.reconstruct(x[None], scale, sigma=25)[0], atol=SAME_TOL,
                               rtol=0)
    dense = as_array(post(server, "/encode", files={"image": ("x.npy", npy(x))}, data={"output": "npy"}))
    np.testing.assert_allclose(dense, backend.encode(x[None], 1.0)[0], atol=SAME_TOL, rtol=0)
    blind = post(server, "/denoise", files={"image": ("x.npy", npy(x))})
    assert blind.status_code == 200 and blind.headers["x-csc-sigma-source"] == "estimated"


def test_concurrent_requests_share_batches_and_each_equals_its_unbatched_result(server, backend):
    sizes = [(32, 32), (40, 24), (32, 32), (40, 24), (32, 32), (27, 35), (32, 32), (40, 24)]
    scales = [1.0, 2.0, 0.5, 3.0, 4.0, 1.5, 2.5, 1.0]
    inputs = [image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    before = _metric(server, "csc_batch_size_sum") - _metric(server, "csc_batch_size_count")

    def call(i):
        files = {"image": ("x.npy", npy(inputs[i]))}
        data = {"lmbda_scale": str(scales[i]), "output": "npy"}
        return as_array(post(server, "/reconstruct", files=files, data=data))

    with ThreadPoolExecutor(len(inputs)) as pool:
        outputs = list(pool.map(call, range(len(inputs))))
    for x, s, out in zip(inputs, scales, outputs):
        np.testing.assert_allclose(out, backend.reconstruct(x[None], s)[0], atol=SAME_TOL, rtol=0)
    after = _metric(server, "csc_batch_size_sum") - _metric(server, "csc_batch_size_count")
    assert after > before  # some batch held more than one request


def test_large_images_are_tiled_and_equal_the_untiled_result(server, backend):
    x = image(150, 131, seed=2)
    tiles = _metric(server, "csc_tiles_total")
    out = as_array(post(server, "/reconstruct", files={"image": ("x.npy", npy(x))}, data={"output": "npy"}))
    assert _metric(server, "csc_tiles_total") - tiles == 9  # 150x131 in 64x64 cores
    np.testing.assert_allclose(out, backend.reconstruct(x[None], 1.0)[0], atol=TILE_TOLERANCE, rtol=0)


def test_metrics_and_readiness(server):
    assert server.status("/readyz") == 200 and server.status("/livez") == 200
    answer = post(server, "/denoise", files={"image": ("x.npy", npy(image(20, 24, seed=5)))}, data={"sigma": "25"})
    assert answer.status_code == 200, answer.text
    assert {"queue;", "backend;", "total;"} <= {part.strip().split("dur=")[0] for part in
                                               answer.headers["server-timing"].split(",")}
    text = httpx.get(server.url + "/metrics", timeout=30).text
    for name in ("csc_batch_size_bucket", "csc_queue_wait_seconds_count", "csc_batch_seconds_sum",
                 'csc_images_total{endpoint=', "bentoml_service_request_duration_seconds_count"):
        assert name in text, name
    for stage in ("read", "queue", "batch", "backend", "encode", "total"):
        bucket = rf'csc_stage_seconds_bucket{{endpoint="denoise",le="[^"]+",stage="{stage}"}} [1-9]'
        assert re.search(bucket, text), stage


# ----------------------------------------------------------------------------- bad input
def _bomb() -> bytes:
    out = io.BytesIO()
    Image.new("L", (4000, 4000)).save(out, "PNG")  # 16 Mpx in about 16 KB
    return out.getvalue()


def _zero_pixel_npy() -> bytes:
    return npy(np.zeros((3, 0, 8), np.float32))


GOOD = png(image(24, 24))
BAD = [
    ("non-image", "/denoise", {"files": {"image": ("a.png", b"plain text, not an image " * 20)}}, 400),
    ("truncated", "/reconstruct", {"files": {"image": ("a.png", GOOD[: len(GOOD) // 2])}}, 400),
    ("zero-pixels", "/reconstruct", {"files": {"image": ("a.npy", _zero_pixel_npy())}}, 400),
    ("bomb", "/denoise", {"files": {"image": ("bomb.png", _bomb())}}, 413),
    ("oversized-body", "/denoise", {"files": {"image": ("big.npy", b"\x00" * (3 << 20))}}, 413),
    ("codes-wrong-shape", "/decode", {"files": {"codes": ("c.npy", npy(np.zeros((74, 4, 4), np.float32)))}}, 400),
    ("codes-wrong-dtype", "/decode", {"files": {"codes": ("c.npy", npy(np.zeros((K, 4, 4), np.int16)))}}, 400),
    ("codes-inf", "/decode", {"files": {"codes": ("c.npy", npy(np.full((K, 4, 4), np.inf, np.float32)))}}, 400),
    ("image-nan", "/encode", {"files": {"image": ("a.npy", npy(np.full((3, 8, 8), np.nan, np.float32)))}}, 400),
    ("sigma-out-of-range", "/denoise", {"files": {"image": ("a.png", GOOD)}, "data": {"sigma": "256"}}, 400),
    ("sigma-negative", "/denoise", {"files": {"image": ("a.png", GOOD)}, "data": {"sigma": "-1"}}, 400),
    ("scale-out-of-range", "/reconstruct", {"files": {"image": ("a.png", GOOD)}, "data": {"lmbda_scale": "1e3"}}, 400),
    ("scale-nan", "/encode", {"files": {"image": ("a.png", GOOD)}, "data": {"lmbda_scale": "nan"}}, 400),
    ("missing-image", "/denoise", {"files": {"sigma": (None, "25")}}, 400),
    ("missing-body", "/encode", {}, 415),
    ("json-body", "/reconstruct", {"json": {"image": "aGVsbG8="}}, 415),
    ("too-many-pixels", "/reconstruct", {"files": {"image": ("a.npy", npy(np.zeros((3, 400, 400), np.float32)))}}, 413),
]


@pytest.mark.parametrize("route,kwargs,status", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_gets_a_4xx_with_a_one_line_reason_never_a_5xx_or_a_hang(server, route, kwargs, status):
    reply = post(server, route, timeout=30, **kwargs)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert isinstance(error, str) and error and "\n" not in error


def test_a_url_in_a_file_field_is_never_fetched(server):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    hits = []

    def accept():
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                hits.append(listener.accept())
            except OSError:
                continue

    watcher = threading.Thread(target=accept)
    watcher.start()
    url = f"http://127.0.0.1:{port}/image.png"
    as_field = post(server, "/denoise", files={"image": (None, url)})
    as_json = post(server, "/denoise", json={"image": url})
    as_form = post(server, "/denoise", data={"image": url})
    watcher.join()
    listener.close()
    assert (as_field.status_code, as_json.status_code, as_form.status_code) == (400, 415, 415)
    assert "never fetched" in as_field.json()["error"]
    assert hits == []
    assert server.status("/readyz") == 200  # and the server is still serving


# ----------------------------------------------------------------------------- the README
def test_readme_serving_examples_work_as_written(server, tmp_path):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Serve over HTTP"):]
    section = section[: section.index("\n## ", 1)]
    assert section.index("make serve") < section.index("curl")  # the first command on a fresh machine
    local = lambda s: s.replace("http://localhost:3000", server.url)  # noqa: E731
    for block in re.findall(r"```py\n(.*?)```", section, flags=re.S):
        result = subprocess.run([sys.executable, "-c", local(block)], cwd=tmp_path, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
    curls = [line for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
             for line in block.splitlines() if line.startswith("curl ")]
    assert len(curls) >= 5
    for line in curls:
        result = subprocess.run(["bash", "-o", "pipefail", "-c", local(line)], cwd=tmp_path, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, (line, result.stdout, result.stderr)
    assert Image.open(tmp_path / "denoised.png").size == Image.open(tmp_path / "noisy.png").size


def _metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))
