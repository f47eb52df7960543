"""Lean serving: one backend pass per image (what an answer reports about the codes comes out of that pass),
where a request's time went (Server-Timing, /metrics), a serving process that loads no PyTorch for the
exported graphs, and noise-adaptive models served with their noise level."""

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from csc_serve.export import export_onnx
from csc_serve.models import CSCAutoencoder, StageConfig
from csc_serve.models.grow import deepen
from csc_serve.models.serialization import weights_sha256
from csc_serve.service.engine import Engine
from csc_serve.service.metrics import STAGES, Timing
from csc_serve.service.settings import ServeSettings

from .conftest import tiny_config
from .test_service_asgi import png, warm_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ((0, 1.0), (25, 2.0), (50, 4.0))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    CSCAutoencoder(tiny_config(noise_calibration=CALIBRATION, shift_average=True, nonnegative=False)).eval() \
        .save_pretrained(directory)
    return directory


class Passes:
    """Counts the images every backend graph runs on."""

    def __init__(self, backend):
        self.images: dict[str, int] = {}
        run = backend._run

        def counted(graph, inputs):
            self.images[graph] = self.images.get(graph, 0) + next(iter(inputs.values())).shape[0]
            return run(graph, inputs)

        backend._run = counted


@pytest.mark.parametrize("tile_size", [4096, 16], ids=["whole", "tiled"])
def test_every_endpoint_runs_one_pass_per_image_and_reports_from_it(model_dir, tile_size):
    engine = Engine(ServeSettings(model=str(model_dir), backend="torch", batch_wait_ms=0, tile_size=tile_size))
    engine.start(background=False)
    passes = Passes(engine.backend)
    image = np.random.default_rng(0).random((3, 30, 36), dtype=np.float32)
    tiles = 1 if tile_size > 100 else 6  # a 32 x 36 stride-padded image in 16-pixel cores: 2 x 3 tiles
    encoded = asyncio.run(engine.encode(image, 1.5))
    assert passes.images == {"encode": tiles}
    reconstructed = asyncio.run(engine.reconstruct(image, 1.5))
    denoised = asyncio.run(engine.denoise(image, sigma=25.0))
    assert passes.images == {"encode": tiles, "reconstruct": 2 * tiles}
    # The figures are those of the model's own codes.
    model = CSCAutoencoder.from_pretrained(model_dir)
    x = torch.from_numpy(image)[None]
    with torch.no_grad():
        stages = model.encode(x, 1.5, all_stages=True)
        _, zeros = model.reconstruct_counting(x, 1.5)
    expected = [float((codes == 0).float().mean()) for codes in stages]
    assert encoded.sparsity == pytest.approx(expected, abs=2e-3)  # a code at its threshold may flip in a tile
    copies = len(model.config.shifts)
    assert reconstructed.sparsity == pytest.approx(float(zeros.sum()) / (8 * copies * zeros.numel()), abs=2e-3)
    assert 0 < denoised.sparsity < 1 and denoised.sparsity != reconstructed.sparsity
    engine.close()


def test_every_answer_says_where_its_time_went_and_metrics_keep_it(model_dir):
    with warm_app({"CSC_MODEL": str(model_dir), "CSC_BACKEND": "torch", "CSC_BATCH_WAIT_MS": "0"}) as app:
        files = {"image": ("a.png", png())}
        answers = {route: app.request("POST", route, files=files, data=data) for route, data in
                   (("/encode", {}), ("/reconstruct", {}), ("/denoise", {}), ("/denoise", {"sigma": "25"}))}
        refused = app.request("POST", "/denoise", files=files, data={"sigma": "25", "lmbda_scale": "2"})
    for route, answer in answers.items():
        assert answer.status_code == 200, route
        timing = _server_timing(answer.headers["server-timing"])
        assert {"read", "queue", "batch", "backend", "encode", "total"} <= set(timing), route
        assert 0 <= timing["backend"] <= timing["batch"] <= timing["total"], route
        assert timing["read"] + timing["batch"] + timing["encode"] <= timing["total"], route
        assert set(timing) <= set(STAGES)
    assert "estimate" not in _server_timing(answers["/denoise"].headers["server-timing"])  # sigma was given
    assert refused.status_code == 400 and "total" in _server_timing(refused.headers["server-timing"])
    for endpoint in ("encode", "reconstruct", "denoise"):
        for stage in ("read", "queue", "backend", "encode", "total"):
            count = REGISTRY.get_sample_value("csc_stage_seconds_count", {"endpoint": endpoint, "stage": stage})
            assert count is not None and count >= 1, (endpoint, stage)


def test_blind_denoising_times_its_noise_estimate():
    timing = Timing()
    timing.add("estimate", 0.25)
    timing.waited(0.5)
    timing.waited(0.125)  # the request's wait is that of its first job to start
    parsed = _server_timing(timing.header())
    assert parsed["estimate"] == 250.0 and parsed["queue"] == 125.0 and list(parsed)[-1] == "total"


def _server_timing(header: str) -> dict[str, float]:
    out = {}
    for entry in header.split(","):
        name, *params = (p.strip() for p in entry.split(";"))
        out[name] = float(next(p for p in params if p.startswith("dur="))[4:])
    return out


def test_the_serving_process_runs_exported_graphs_without_pytorch(model_dir, tmp_path):
    model = CSCAutoencoder.from_pretrained(model_dir)
    export_onnx(model, tmp_path / "art", weights_sha256=weights_sha256(model))
    code = f"""
import asyncio, sys
import numpy as np
import csc_serve.service.api
assert "torch" not in sys.modules, "the service module imported torch"
from csc_serve.service.engine import Engine
from csc_serve.service.settings import ServeSettings
engine = Engine(ServeSettings(model={str(model_dir)!r}, artifacts={str(tmp_path / 'art')!r},
                              backend="onnxruntime-cpu", batch_wait_ms=0)).start(background=False)
image = np.random.default_rng(0).random((3, 40, 44), dtype=np.float32)
blind = asyncio.run(engine.denoise(image))
codes = asyncio.run(engine.encode(image))
print("torch" in sys.modules, blind.sigma_source, len(codes.sparsity))
atoms = asyncio.run(engine.atoms())  # the PyTorch model, loaded on first use
print("torch" in sys.modules, atoms.atoms.shape[0])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "estimated", "2", "True", "8"]


def test_a_noise_adaptive_model_is_served_with_its_noise_level(tmp_path):
    torch.manual_seed(0)
    plain = CSCAutoencoder(tiny_config(stages=(
        StageConfig(num_atoms=6, kernel_size=5, stride=2, lmbda=0.05, num_steps=4, learned_steps=True),
        StageConfig(num_atoms=8, kernel_size=1, stride=1, lmbda=0.05, num_steps=2, learned_steps=True),
    ), nonnegative=False, shift_average=True, noise_calibration=CALIBRATION))
    model = deepen(plain, 0, thresholds="noise_affine").eval()
    with torch.no_grad():
        model.stages[0].threshold_slopes.copy_(torch.randn(4, 6) * 20)
    model.save_pretrained(tmp_path / "m")
    manifest = export_onnx(model, tmp_path / "art", weights_sha256=weights_sha256(model))
    for graph in ("encode", "reconstruct"):
        names = [spec["name"] for spec in manifest["onnx"]["graphs"][graph]["inputs"]]
        assert names == ["images", "lmbda_scale", "sigma"]
    assert manifest["onnx"]["graphs"]["reconstruct"]["parity"]["max_abs_error"] < 1e-4
    engine = Engine(ServeSettings(model=str(tmp_path / "m"), artifacts=str(tmp_path / "art"),
                                  backend="onnxruntime-cpu", batch_wait_ms=0)).start(background=False)
    image = np.random.default_rng(1).random((3, 20, 24), dtype=np.float32)
    with torch.no_grad():
        expected = {s: model.denoise(torch.from_numpy(image)[None], s)[0].numpy() for s in (10.0, 40.0)}
        plain_codes = model.encode(torch.from_numpy(image)[None], model.lmbda_scale_for_sigma(40.0))[0].numpy()
    for sigma, want in expected.items():
        got = asyncio.run(engine.denoise(image, sigma=sigma)).image
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(expected[10.0] - expected[40.0]).max() > 1e-3
    codes = asyncio.run(engine.encode(image, sigma=40.0)).codes
    with torch.no_grad():
        want = model.encode(torch.from_numpy(image)[None], model.lmbda_scale_for_sigma(40.0), sigma=40.0)[0].numpy()
    np.testing.assert_allclose(codes, want, atol=1e-4)
    assert np.abs(codes - plain_codes).max() > 1e-4  # the noise level moved the thresholds
    engine.close()
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architecture"]["stages"][0]["thresholds"] \
        == "noise_affine"


def test_the_openapi_example_of_metadata_names_the_bundled_model():
    from csc_serve.models.serialization import read_config
    from csc_serve.service.api import METADATA_EXAMPLE
    from csc_serve.service.tiling import receptive_margin

    config, document = read_config(ROOT / "models" / "pretrained" / "csc-ctrl-rgb")
    example = METADATA_EXAMPLE["model"]
    assert example["weights_sha256"] == document["weights_sha256"][:8] + "..."
    assert example["code_channels"] == config.code_channels and example["total_stride"] == config.total_stride
    assert example["tile_margin"] == receptive_margin(config)


def test_the_heap_is_trimmed_once_large_work_ends_and_seldom_under_load(monkeypatch):
    """The C heap goes back to the system a quiet moment after large work, not after every batch of a steady
    load (each trim makes the next batches fault their pages back in)."""
    import time

    from csc_serve.service.batch_call import _GiveBack

    give_back = _GiveBack()
    calls = []
    give_back.trim = lambda pad: calls.append(pad)
    monkeypatch.setattr(_GiveBack, "TRIM_VALUES", 100)
    monkeypatch.setattr(_GiveBack, "QUIET_S", 0.5)
    monkeypatch.setattr(_GiveBack, "INTERVAL_S", 60.0)
    give_back.last = time.monotonic()
    give_back.after_batch(50)
    time.sleep(1.0)
    assert calls == []  # small work: nothing to give back
    for _ in range(10):  # a steady load: every batch postpones the trim
        give_back.after_batch(60)
        time.sleep(0.02)
    assert calls == []
    time.sleep(1.5)  # the load stops: one trim after the quiet time
    assert calls == [0]
    give_back.last -= 120.0  # long since the last trim: the next large batch trims at once
    give_back.after_batch(200)
    assert calls == [0, 0]
    time.sleep(1.0)
    assert calls == [0, 0]
