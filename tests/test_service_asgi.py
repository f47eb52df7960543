"""The service in-process: its methods called directly, and its ASGI app (middleware, lifecycle) over httpx."""

import asyncio
import io
import json
import threading

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from csc_serve.service.api import CSCService
from csc_serve.service.engine import Engine
from csc_serve.service.settings import ServeSettings
from csc_serve.models import CSCAutoencoder

from .conftest import tiny_config

TOKEN = "test-token-0123456789"
CALIBRATION = ((0, 1.0), (25, 2.0), (50, 4.0))
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    CSCAutoencoder(tiny_config(noise_calibration=CALIBRATION)).eval().save_pretrained(directory)
    return directory


def png(height=24, width=30, seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


# ----------------------------------------------------------------------------- direct calls
def test_the_service_methods_answer_in_process(model_dir, tmp_path):
    service = CSCService.inner(ServeSettings(model=str(model_dir), backend="torch", batch_wait_ms=0))
    assert service.engine.wait_ready(60) and service.__is_ready__()
    (tmp_path / "in.png").write_bytes(png())
    denoised = asyncio.run(service.denoise(image=tmp_path / "in.png", sigma=25.0))
    assert denoised.status_code == 200 and denoised.media_type == "image/png"
    assert denoised.headers["x-csc-lmbda-scale"] == "2" and denoised.headers["x-csc-sigma-source"] == "given"
    assert Image.open(io.BytesIO(denoised.body)).size == (30, 24)
    codes = asyncio.run(service.encode(image=tmp_path / "in.png", lmbda_scale=1.0))
    assert codes.headers["x-csc-code-shape"] == "8,12,15"
    assert len(codes.headers["x-csc-sparsity"].split(",")) == 2  # one figure per stage
    (tmp_path / "codes.npz").write_bytes(codes.body)
    decoded = asyncio.run(service.decode(codes=tmp_path / "codes.npz", output="npy"))
    image = np.load(io.BytesIO(decoded.body), allow_pickle=False)
    assert image.shape == (3, 24, 30) and decoded.headers["x-csc-image-size"] == "24,30"
    refused = asyncio.run(service.reconstruct(image=tmp_path / "codes.npz"))
    assert refused.status_code == 400 and "not an image file" in json.loads(refused.body)["error"]
    service.close()


# ----------------------------------------------------------------------------- the ASGI app
class App:
    """The service's ASGI app with its lifespan entered, on an event loop in a thread of its own."""

    def __init__(self, app):
        self.app, self.loop = app, asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._lifespan = app.router.lifespan_context(app)
        self.run(self._lifespan.__aenter__())
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service")

    def run(self, coroutine, timeout=120):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def request(self, method, path, **kwargs) -> httpx.Response:
        return self.run(self.client.request(method, path, **kwargs))

    def close(self):
        self.run(self.client.aclose())
        self.run(self._lifespan.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def app(model_dir):
    gate = threading.Event()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"CSC_MODEL": str(model_dir), "CSC_BACKEND": "torch", "CSC_SERVE_TOKEN": TOKEN,
                            "CSC_MAX_BODY_BYTES": "200000", "CSC_BATCH_WAIT_MS": "0"}.items():
            patch.setenv(name, value)
        warm_up = Engine._warm_up
        patch.setattr(Engine, "_warm_up", lambda self: (gate.wait(60), warm_up(self)))
        running = App(CSCService.to_asgi())
        running.gate = gate
        yield running
        running.close()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_readyz_is_false_until_the_model_is_warm_then_true(app):
    assert app.request("GET", "/livez").status_code == 200
    assert app.request("GET", "/readyz").status_code == 503
    early = app.request("POST", "/reconstruct", files={"image": ("a.png", png())}, headers=AUTH)
    assert early.status_code == 503 and "still loading" in early.json()["error"]
    app.gate.set()
    for _ in range(600):
        if app.request("GET", "/readyz").status_code == 200:
            break
        app.run(asyncio.sleep(0.05))
    assert app.request("GET", "/readyz").status_code == 200
    ok = app.request("POST", "/reconstruct", files={"image": ("a.png", png())}, headers=AUTH)
    assert ok.status_code == 200 and float(ok.headers["x-csc-psnr"]) > 0


def test_every_post_needs_the_bearer_token_when_one_is_set(app):
    app.gate.set()
    files = {"image": ("a.png", png())}
    for headers in ({}, {"Authorization": "Bearer wrong-token-000"}, {"Authorization": TOKEN}):
        answer = app.request("POST", "/denoise", files=files, headers=headers)
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
    assert app.request("POST", "/metadata", headers={}).status_code == 401
    for open_path in ("/livez", "/readyz", "/docs.json"):  # /metrics: over HTTP, in test_service_http
        assert app.request("GET", open_path).status_code == 200


def test_metadata_names_the_model_backend_and_versions(app, model_dir):
    app.gate.set()
    meta = app.request("POST", "/metadata", json={}, headers=AUTH).json()
    assert meta["model"]["directory"] == str(model_dir) and meta["model"]["kind"] == "directory"
    assert len(meta["model"]["weights_sha256"]) == 64 and meta["model"]["config"]["stages"][1]["stride"] == 2
    assert meta["backend"]["backend"] == "torch" and meta["settings"]["token"] == "set"
    assert TOKEN not in json.dumps(meta)
    assert {"bentoml", "torch", "numpy"} <= set(meta["versions"]) and meta["process"]["rss_bytes"] > 0


@pytest.mark.parametrize("kwargs,status,message", [
    ({"files": {"image": ("a.png", png())}, "data": {"sigma": "300"}}, 400, "sigma: Input should be less than"),
    ({"data": {"sigma": "3"}}, 415, "multipart/form-data"),
    ({"files": {"sigma": (None, "3")}}, 400, "image: Field required"),
    ({"files": {"image": ("a.png", png()), "other": ("b.png", png())}}, 400, "field 'other' takes no file"),
    ({"files": {"image": ("a.png", png())}, "data": {"lmbda_scale": "NaN"}}, 400,
     "lmbda_scale: Input should be a finite"),
    ({"files": {"image": ("a.png", png())}, "data": {"output": "gif"}}, 400, "output: Input should be"),
    ({"json": {"image": "http://127.0.0.1:9/x.png"}}, 415, "multipart/form-data"),
    ({"files": {"image": ("big.png", png(400, 400))}}, 413, "exceeds the cap of 200000 bytes"),
])
def test_bad_requests_get_a_4xx_with_one_line(app, kwargs, status, message):
    app.gate.set()
    answer = app.request("POST", "/denoise", headers=AUTH, **kwargs)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert message in error and "\n" not in error


def test_openapi_documents_every_endpoint_with_examples(app):
    spec = app.request("GET", "/docs.json").json()
    for route in ("/encode", "/decode", "/reconstruct", "/denoise", "/metadata"):
        assert route in spec["paths"], route
        assert spec["paths"][route]["post"]["description"]
    fields = spec["paths"]["/denoise"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert fields["properties"]["sigma"]["examples"] == [25.0] and fields["properties"]["sigma"]["maximum"] == 255
    assert "X-CSC-Sigma" in spec["paths"]["/denoise"]["post"]["description"]
    assert "allow_pickle=False" in spec["paths"]["/encode"]["post"]["description"]
    answer = spec["paths"]["/metadata"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert answer["example"]["model"]["reference"] == "csc-ctrl-rgb"


def test_finished_requests_leave_no_timer_holding_their_context(app):
    """BentoML's own timeout middleware kept each request's timer (and context) for the whole timeout."""
    app.gate.set()

    async def burst():
        files = {"image": ("a.png", png())}
        return await asyncio.gather(*[app.client.post("/reconstruct", files=files, headers=AUTH) for _ in range(40)])

    assert all(answer.status_code == 200 for answer in app.run(burst()))
    live = [h for h in app.loop._scheduled if not h.cancelled() and h.when() - app.loop.time() > 100]
    assert live == []


def test_a_request_past_the_timeout_gets_a_504_and_the_work_is_cancelled():
    from csc_serve.service.guard import CancelledTimeout

    cancelled = asyncio.Event()

    async def slow(scope, receive, send):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def fast(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def call(inner):
        sent = []

        async def send(message):
            sent.append(message)

        await CancelledTimeout(inner, timeout=0.2)({"type": "http"}, None, send)
        await asyncio.sleep(0)
        return sent

    async def both():
        results = await call(slow), cancelled.is_set(), await call(fast)
        return (*results, [h for h in asyncio.get_running_loop()._scheduled if not h.cancelled()])

    timed_out, was_cancelled, answered, timers = asyncio.run(both())
    assert timed_out[0]["status"] == 504 and b"0.2 seconds" in timed_out[1]["body"] and was_cancelled
    assert answered[0]["status"] == 200 and answered[1]["body"] == b"ok"
    assert timers == []
