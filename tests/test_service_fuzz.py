"""The HTTP API as a fuzzer sees it: requests generated from the service's own OpenAPI document (schemathesis),
sent in-process to its ASGI app. No answer may be a 5xx, every status must be documented for its operation,
and every answer must match what the document says of it (media type, body schema).

The budget is fixed and small (``EXAMPLES`` per operation and generation mode, derandomized) so that the run
is the same every time and takes seconds; ``CSC_FUZZ_EXAMPLES=500`` runs a longer, random fuzz by hand.
"""

import io
import os

import numpy as np
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image

from csc_serve.models import CSCAutoencoder
from csc_serve.service.api import ROUTES
from csc_serve.service.codes import to_sparse

from .conftest import tiny_config
from .test_service_asgi import warm_app

EXAMPLES = int(os.environ.get("CSC_FUZZ_EXAMPLES", "25"))
FIXED = "CSC_FUZZ_EXAMPLES" not in os.environ
CODE_CHANNELS, STRIDE = 8, 2  # tiny_config: 8 atoms in the last stage, total stride 2
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


@st.composite
def _pngs(draw):
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    channels = draw(st.sampled_from([(), (3,), (4,)]))
    seed = draw(st.integers(0, 2**16))
    return _png(np.random.default_rng(seed).integers(0, 256, (h, w, *channels), dtype=np.uint8))


@st.composite
def _arrays(draw):
    shape = draw(st.sampled_from([(3,), (1, 3), ()])) + (draw(st.integers(0, 24)), draw(st.integers(0, 24)))
    dtype = draw(st.sampled_from([np.float32, np.float32, np.float64, np.float16, np.int32]))
    fill = draw(st.sampled_from(["noisy", "noisy", "noisy", "nan", "inf", "big"]))
    array = np.random.default_rng(draw(st.integers(0, 2**16))).normal(0.5, 0.2, shape)
    array = {"noisy": array, "nan": array * np.nan, "inf": array + np.inf, "big": array * 1e6}[fill]
    with np.errstate(all="ignore"):  # NaN, Inf and overflow in integer and float16 arrays are the point
        return _npy(array.astype(dtype))


@st.composite
def _codes(draw):
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    codes = np.random.default_rng(draw(st.integers(0, 2**16))).normal(size=(CODE_CHANNELS, h, w))
    codes[np.abs(codes) < 1] = 0
    size = (draw(st.integers(1, h * STRIDE + 2)), draw(st.integers(1, w * STRIDE + 2)))
    if draw(st.booleans()):
        return _npy(codes.astype(np.float32))
    return to_sparse(codes.astype(np.float32), size, [0.5], 1.0, draw(st.sampled_from(["float32", "float16"])))


# Files the service reads (images, arrays, sparse codes) beside arbitrary bytes: requests reach the model too.
FILES = st.one_of(st.binary(max_size=256), _pngs(), _arrays(), _codes())


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The service's ASGI app, warm, on an event loop of its own (schemathesis' pytest plugin ends the lifespans
    its ASGI transport starts after every test, which would reload the model each time)."""
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    calibration = ((0, 1.0), (25, 2.0), (50, 4.0))
    CSCAutoencoder(tiny_config(noise_calibration=calibration)).eval().save_pretrained(directory)
    with warm_app({"CSC_MODEL": str(directory), "CSC_BACKEND": "torch", "CSC_BATCH_WAIT_MS": "0",
                   "CSC_MAX_BODY_BYTES": "100000", "CSC_MAX_PIXELS": str(48 * 48), "CSC_TILE_SIZE": "16"}) as running:
        yield running


@pytest.fixture(scope="module")
def api_schema(app):
    from schemathesis.specs.openapi.formats import register_string_format, unregister_string_format

    register_string_format("binary", FILES)
    yield schemathesis.openapi.from_dict(app.request("GET", "/docs.json").json())
    unregister_string_format("binary")


# Every endpoint, with valid and invalid input; the probes take none (/metrics needs a served process: it is
# checked over HTTP in test_service_http).
OPERATIONS = [(route, "POST", mode) for route in ROUTES for mode in ("positive", "negative")]
OPERATIONS += [(path, "GET", "positive") for path in ("/livez", "/readyz", "/healthz")]


@pytest.mark.parametrize("path,method,mode", OPERATIONS)
def test_no_answer_is_a_5xx_or_undocumented(app, api_schema, path, method, mode):
    import requests
    from hypothesis import given
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
              response_schema_conformance]

    @given(case=api_schema[path][method].as_strategy(schemathesis.GenerationMode(mode)))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=FIXED, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case):
        # The request exactly as schemathesis' requests transport would send it, sent to the app in-process.
        request = requests.Request(**case.as_transport_kwargs(base_url="http://service")).prepare()
        answer = app.request(request.method, request.url, content=request.body, headers=dict(request.headers))
        case.validate_response(answer, checks=checks)

    fuzz()

