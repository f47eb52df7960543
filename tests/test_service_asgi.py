"""The service in-process: its methods called directly, and its ASGI app (middleware, lifecycle) over httpx."""

import asyncio
import contextlib
import io
import json
import os
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from csc_serve.models import CSCAutoencoder
from csc_serve.service.api import ROUTES, CSCService
from csc_serve.service.engine import Engine
from csc_serve.service.metadata import HIDDEN
from csc_serve.service.settings import ServeSettings

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


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def upload(route: str) -> dict:
    """A valid file for ``route`` (tiny_config: 8 code maps)."""
    if route == "/decode":
        return {"codes": ("c.npy", npy(np.zeros((8, 6, 7), np.float32)))}
    return {"image": ("a.png", png())}


def strings(value):
    """Every string in a JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


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


@contextlib.contextmanager
def warm_app(env: dict[str, str]):
    """The service's app with ``env`` set and no token, once ``/readyz`` says the model is warm. BentoML's
    request metrics stay off: their collectors register once per process, and another app may hold them."""
    from _bentoml_impl.server.app import ServiceAppFactory

    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        patch.delenv("CSC_SERVE_TOKEN", raising=False)
        CSCService.inject_config()
        running = App(ServiceAppFactory(CSCService, is_main=True, enable_metrics=False)())
        deadline = time.monotonic() + 120
        while running.request("GET", "/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)
        yield running
        running.close()


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
    spec = app.request("GET", "/docs.json").json()
    assert "503" in spec["paths"]["/readyz"]["get"]["responses"]
    for route, kind in ROUTES.items():  # every endpoint that waits for the model says so, and documents it
        early = app.request("POST", route, files=upload(route) if kind.files else None,
                            json=None if kind.files else {}, headers=AUTH)
        if kind.waits_for_model:
            assert early.status_code == 503 and "still loading" in early.json()["error"], route
            assert "503" in spec["paths"][route]["post"]["responses"], route
        else:
            assert early.status_code == 200 and early.json()["ready"] is False
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


def test_metadata_names_the_model_backend_and_versions_but_no_path(app, model_dir):
    app.gate.set()
    meta = app.request("POST", "/metadata", json={}, headers=AUTH).json()
    assert meta["model"]["kind"] == "directory" and meta["model"]["directory"] == HIDDEN
    assert meta["model"]["reference"] == HIDDEN and meta["settings"]["model"] == HIDDEN
    assert len(meta["model"]["weights_sha256"]) == 64 and meta["model"]["config"]["stages"][1]["stride"] == 2
    assert meta["backend"]["backend"] == "torch" and meta["settings"]["token"] == "set"
    assert meta["settings"]["show_paths"] is False
    assert TOKEN not in json.dumps(meta)
    assert {"bentoml", "torch", "numpy"} <= set(meta["versions"]) and meta["process"]["rss_bytes"] > 0
    text = json.dumps(meta)
    assert str(model_dir) not in text and str(Path.home()) not in text and os.sep + "tmp" not in text
    assert not [value for value in strings(meta) if value.startswith(("/", "~"))]


def test_metadata_shows_paths_only_when_the_setting_is_on(model_dir):
    service = CSCService.inner(ServeSettings(model=str(model_dir), backend="torch", show_paths=True))
    try:
        meta = asyncio.run(service.metadata())
    finally:
        service.close()
    assert meta["model"]["directory"] == str(model_dir) and meta["settings"]["model"] == str(model_dir)
    assert meta["settings"]["show_paths"] is True


@pytest.mark.parametrize("kwargs,status,message", [
    ({"files": {"image": ("a.png", png())}, "data": {"sigma": "300"}}, 400, "sigma: Input should be less than"),
    ({"data": {"sigma": "3"}}, 415, "multipart/form-data"),
    ({"files": {"sigma": (None, "3")}}, 400, "image: Field required"),
    ({"files": {"image": ("a.png", png()), "other": ("b.png", png())}}, 400, "field 'other' takes no file"),
    ({"files": {"image": ("a.png", png())}, "data": {"lmbda_scale": "NaN"}}, 400,
     "lmbda_scale: Input should be a finite"),
    ({"files": {"image": ("a.png", png())}, "data": {"output": "gif"}}, 400, "output: Input should be"),
    ({"files": {"image": ("a.png", png())}, "data": {"sigma": "false"}}, 400, "sigma: Input should be a valid number"),
    ({"files": {"image": ("a.png", png())}, "data": {"lmbda_scale": "true"}}, 400, "lmbda_scale: Input should be"),
    ({"json": {"image": "http://127.0.0.1:9/x.png"}}, 415, "multipart/form-data"),
    ({"files": {"image": ("big.png", png(400, 400))}}, 413, "exceeds the cap of 200000 bytes"),
    ({"content": b"--x\r\n\r\n--x--\r\n", "headers": {"Content-Type": "multipart/form-data"}}, 400,
     "multipart body without a boundary"),
    ({"content": b"--x\r\nContent-Disposition: form-data; name=image; filename=a.png\r\n\r\n\x89PNG",
      "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, 400, "ends before its closing boundary"),
    ({"content": b"junk", "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, 400,
     "malformed multipart body"),
    ({"content": b"--x\r\nContent-Type: image/png\r\n\r\n\x89PNG\r\n--x--\r\n",
      "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, 400, "a multipart part without a name"),
    ({"files": {"image": ("a.png", png())}, "data": {"sigma": "[" * 100}}, 400, "field 'sigma' nests more"),
    ({"files": {"image": ("a.png", png())}, "data": {"sigma": "9" * 5000}}, 400, "field 'sigma' is not a readable"),
    ({"files": {"image": ("a.png", png())}, "headers": {"Content-Length": "12x"}}, 400, "is not a number of bytes"),
])
def test_bad_requests_get_a_4xx_with_one_line(app, kwargs, status, message):
    app.gate.set()
    kwargs = {**kwargs, "headers": {**AUTH, **kwargs.get("headers", {})}}
    answer = app.request("POST", "/denoise", **kwargs)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert message in error and "\n" not in error


MALFORMED = {  # what a fuzzer sends every route, and the status each must get
    "multipart without a boundary": ({"Content-Type": "multipart/form-data"}, b"--x\r\n\r\nimage\r\n--x--", None),
    "empty boundary": ({"Content-Type": "multipart/form-data; boundary="}, b"", None),
    "broken multipart": ({"Content-Type": "multipart/form-data; boundary=x"}, b"--x\r\n\xff\xfe\r\n", None),
    "text": ({"Content-Type": "text/plain"}, b"hello", 415),
    "pickle": ({"Content-Type": "application/vnd.bentoml+pickle"}, b"\x80\x04N.", 415),
    "form": ({"Content-Type": "application/x-www-form-urlencoded"}, b"image=http://127.0.0.1:9/x.png", 415),
    "two content types": ({"Content-Type": "application/json, multipart/form-data"}, b"{}", 415),
    "over the body cap": ({"Content-Type": "multipart/form-data; boundary=x"}, b"\0" * 200_001, 413),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
@pytest.mark.parametrize("route", ROUTES)
def test_every_route_answers_malformed_bodies_with_a_documented_4xx(app, route, case):
    app.gate.set()
    headers, body, status = MALFORMED[case]
    answer = app.request("POST", route, content=body, headers={**AUTH, **headers})
    if status is None:  # a malformed multipart body: 400 where multipart is taken, 415 where it is not
        status = 400 if ROUTES[route].files or ROUTES[route].form else 415
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json" and set(answer.json()) == {"error"}
    assert "\n" not in answer.json()["error"]
    documented = app.request("GET", "/docs.json").json()["paths"][route]["post"]["responses"]
    assert str(status) in documented


def test_openapi_documents_every_endpoint_with_examples(app):
    spec = app.request("GET", "/docs.json").json()
    assert set(ROUTES) == {api.route for api in CSCService.apis.values()}
    for route, kind in ROUTES.items():
        assert route in spec["paths"], route
        assert spec["paths"][route]["post"]["description"]
        answers = spec["paths"][route]["post"]["responses"]
        expected = {"200", "400", "401", "408", "413", "415", "500", "504"}  # 401: this app runs with a token
        expected |= {"503"} if kind.waits_for_model else set()
        assert set(answers) == expected, route
        for status in expected - {"200"}:
            assert answers[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
        assert set(answers["200"]["content"]) == set(kind.answers), route
        assert spec["paths"][route]["post"]["security"] == [{"bearer": []}]
        if kind.files:  # no body at all is a 415, so the form is required
            assert spec["paths"][route]["post"]["requestBody"]["required"] is True, route
    assert spec["components"]["schemas"]["Error"]["required"] == ["error"]
    assert set(spec["paths"]["/decode"]["post"]["responses"]["200"]["content"]) == {"image/png",
                                                                                   "application/octet-stream"}
    assert set(spec["paths"]["/atoms"]["post"]["requestBody"]["content"]) == {"application/json",
                                                                             "multipart/form-data"}
    decode = spec["paths"]["/decode"]["post"]
    assert {"keep", "drop"} <= set(decode["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"])
    assert "X-CSC-Atoms-Kept" in decode["description"]
    explain = spec["paths"]["/explain"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "lmbda_scale", "sigma", "atoms", "top"} <= set(explain["properties"])
    fields = spec["paths"]["/denoise"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert fields["properties"]["sigma"]["examples"] == [25.0] and fields["properties"]["sigma"]["maximum"] == 255
    assert fields["properties"]["sigma"]["nullable"] is True  # null: not given, the sigma is estimated
    assert "nullable" not in fields["properties"]["output"]
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
