"""Adaptive batching: the batcher on its own, then the engine's batched results against unbatched ones."""

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from csc_serve.models import CSCAutoencoder
from csc_serve.service.batcher import Batcher, QueueFull
from csc_serve.service.engine import Engine
from csc_serve.service.payloads import RequestError
from csc_serve.service.settings import ServeSettings

from .conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Equal-sized images go through the same kernels batched or alone; what may differ is the order of float32
# sums inside a kernel, far below this.
BATCH_TOL = 1e-5


class Recorder:
    def __init__(self, fail_on=None):
        self.batches, self.fail_on = [], fail_on

    def __call__(self, key, payloads):
        self.batches.append((key, list(payloads)))
        if key == self.fail_on:
            raise ValueError("boom")
        return [p * 10 for p in payloads]


def test_batches_hold_one_key_oldest_first_and_respect_size_and_pixel_limits():
    run = Recorder()
    batcher = Batcher(run, max_batch_size=3, max_batch_pixels=100, wait_s=0.2)
    jobs = [("a", 1, 10), ("b", 2, 10), ("a", 3, 10), ("a", 4, 10), ("a", 5, 10), ("c", 6, 60), ("c", 7, 60)]
    futures = [batcher.submit(key, payload, pixels) for key, payload, pixels in jobs]
    assert [f.result(timeout=10) for f in futures] == [10, 20, 30, 40, 50, 60, 70]
    batcher.close()
    assert [(key, payloads) for key, payloads in run.batches] == [
        ("a", [1, 3, 4]), ("b", [2]), ("a", [5]), ("c", [6]), ("c", [7])]


def test_a_lone_request_waits_at_most_the_batch_window():
    batcher = Batcher(Recorder(), wait_s=0.05)
    start = time.monotonic()
    assert batcher.submit("a", 1).result(timeout=10) == 10
    assert time.monotonic() - start < 1.0
    batcher.close()


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on():
    batcher = Batcher(Recorder(fail_on="bad"), wait_s=0.0)
    with pytest.raises(ValueError, match="boom"):
        batcher.submit("bad", 1).result(timeout=10)
    assert batcher.submit("good", 2).result(timeout=10) == 20
    batcher.close()


def test_cancelled_requests_are_left_out_and_a_full_queue_refuses():
    gate = threading.Event()
    run = Recorder()

    def slow(key, payloads):
        gate.wait(10)
        return run(key, payloads)

    batcher = Batcher(slow, wait_s=0.0, max_queue=2)
    first = batcher.submit("a", 1)
    time.sleep(0.1)  # the worker holds the first batch
    cancelled, kept = batcher.submit("a", 2), batcher.submit("a", 3)
    with pytest.raises(QueueFull):
        batcher.submit("a", 4)
    assert cancelled.cancel()
    gate.set()
    assert first.result(timeout=10) == 10 and kept.result(timeout=10) == 30
    assert [payloads for _, payloads in run.batches] == [[1], [3]]
    batcher.close()


# ----------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def engine(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    CSCAutoencoder(tiny_config(noise_calibration=((0, 1.0), (25, 2.0), (50, 4.0)))).eval().save_pretrained(directory)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CSC_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))  # graphs exported on first use
        settings = ServeSettings(model=str(directory), backend=request.param, batch_wait_ms=200)
        engine = Engine(settings).start(background=False)
    yield engine
    engine.close()


def images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random((3, h, w), dtype=np.float32) for h, w in sizes]


def record_batches(engine):
    sizes = []
    observe = engine.batcher.observe
    engine.batcher.observe = lambda size, waits, seconds: (sizes.append(size), observe(size, waits, seconds))
    return sizes


def test_concurrent_requests_of_mixed_sizes_and_scales_batch_and_equal_the_unbatched_results(engine):
    sizes = [(20, 24), (21, 31), (20, 24), (17, 17), (20, 24), (21, 31)]
    scales = [0.5, 1.0, 3.0, 1.5, 1.0, 2.5]
    inputs = images(sizes)

    async def together():
        return await asyncio.gather(*(engine.reconstruct(x, s) for x, s in zip(inputs, scales)))

    batch_sizes = record_batches(engine)
    batched = asyncio.run(together())
    assert sorted(batch_sizes, reverse=True)[:2] == [3, 2]  # the three 20x24 and the two 21x31 shared batches
    for x, s, result in zip(inputs, scales, batched):
        alone = asyncio.run(engine.reconstruct(x, s))
        assert result.image.shape == x.shape
        np.testing.assert_allclose(result.image, alone.image, atol=BATCH_TOL, rtol=0)
        assert result.sparsity == pytest.approx(alone.sparsity, abs=1e-3)
    # The scale is per request inside a batch: same image, different scales, different sparsity.
    assert batched[0].lmbda_scale == 0.5 and batched[2].lmbda_scale == 3.0


def test_scales_inside_one_batch_act_per_request(engine):
    x = images([(24, 24)], seed=3)[0]

    async def together():
        return await asyncio.gather(*(engine.encode(x, s, stage_sparsity=False) for s in (0.0, 1.0, 8.0)))

    batch_sizes = record_batches(engine)
    results = asyncio.run(together())
    assert 3 in batch_sizes
    last = [r.sparsity[-1] for r in results]
    assert last[0] < last[1] < last[2]  # a larger threshold gives sparser codes
    for s, result in zip((0.0, 1.0, 8.0), results):
        alone = asyncio.run(engine.encode(x, s, stage_sparsity=False))
        np.testing.assert_allclose(result.codes, alone.codes, atol=BATCH_TOL, rtol=0)


def test_results_match_the_model_itself(engine):
    x = images([(22, 26)], seed=4)[0]
    model = CSCAutoencoder.from_pretrained(engine.source.directory)
    with torch.no_grad():
        t = torch.from_numpy(x[None])
        stages = model.encode(t, 2.0, all_stages=True)
        reconstruction = model.reconstruct(t, 2.0)[0].numpy()
    encoded = asyncio.run(engine.encode(x, 2.0))
    np.testing.assert_allclose(encoded.codes, stages[-1][0].numpy(), atol=1e-4)  # torch vs exported graphs
    expected = [float((s == 0).float().mean()) for s in stages]
    assert encoded.sparsity == pytest.approx(expected, abs=2e-3)  # a few codes near the threshold may flip
    result = asyncio.run(engine.reconstruct(x, 2.0))
    np.testing.assert_allclose(result.image, reconstruction, atol=1e-4)
    mse = float(np.mean((np.clip(reconstruction, 0, 1) - x) ** 2))
    assert result.psnr == pytest.approx(-10 * np.log10(mse), abs=1e-2)
    decoded = asyncio.run(engine.decode(encoded.codes, x.shape[1:]))
    np.testing.assert_allclose(decoded, result.image, atol=1e-4)


def test_denoise_uses_the_calibrated_scale_or_the_estimated_sigma(engine):
    y, x = np.mgrid[0:64, 0:64] / 64.0
    clean = np.stack([0.2 + 0.6 * x, 0.3 + 0.4 * y, 0.5 + 0.2 * x * y]).astype(np.float32)
    noisy = clean + np.random.default_rng(5).normal(0, 20 / 255, clean.shape).astype(np.float32)
    given = asyncio.run(engine.denoise(noisy, sigma=25))
    assert given.lmbda_scale == pytest.approx(2.0) and given.sigma_source == "given"
    np.testing.assert_allclose(given.image, asyncio.run(engine.reconstruct(noisy, 2.0)).image, atol=1e-5)
    blind = asyncio.run(engine.denoise(noisy))
    assert blind.sigma_source == "estimated" and blind.sigma == pytest.approx(20, abs=3)
    assert blind.lmbda_scale == pytest.approx(1.0 + blind.sigma / 25, abs=1e-4)  # the calibration's first segment
    explicit = asyncio.run(engine.denoise(noisy, lmbda_scale=3.0))
    assert explicit.sigma is None and explicit.lmbda_scale == 3.0


@pytest.mark.parametrize("call,message", [
    (lambda e, x: e.denoise(x, sigma=10, lmbda_scale=2), "not both"),
    (lambda e, x: e.denoise(x, sigma=300), "sigma must lie in [0, 255]"),
    (lambda e, x: e.reconstruct(x, 101.0), "lmbda_scale must lie in [0, 100]"),
    (lambda e, x: e.reconstruct(x, float("nan")), "lmbda_scale must lie"),
    (lambda e, x: e.denoise(x[:, :8, :8]), "cannot estimate the noise level"),
    (lambda e, x: e.decode(np.zeros((8, 5, 5), np.float32), (30, 9)), "describe images of up to 10x10"),
])
def test_bad_arguments_are_request_errors(engine, call, message):
    with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("]", r"\]")) as caught:
        asyncio.run(call(engine, images([(24, 24)])[0]))
    assert caught.value.status == 400


def test_a_model_without_calibration_refuses_sigma(tmp_path):
    torch.manual_seed(0)
    CSCAutoencoder(tiny_config()).save_pretrained(tmp_path / "m")
    engine = Engine(ServeSettings(model=str(tmp_path / "m"), backend="torch")).start(background=False)
    with pytest.raises(RequestError, match="no noise calibration"):
        asyncio.run(engine.denoise(images([(16, 16)])[0], sigma=10))
    engine.close()


def test_requests_wait_for_loading_and_a_failed_load_is_reported(tmp_path, monkeypatch):
    torch.manual_seed(0)
    CSCAutoencoder(tiny_config()).save_pretrained(tmp_path / "m")
    gate = threading.Event()
    warm_up = Engine._warm_up
    monkeypatch.setattr(Engine, "_warm_up", lambda self: (gate.wait(30), warm_up(self)))
    engine = Engine(ServeSettings(model=str(tmp_path / "m"), backend="torch")).start(background=True)
    x = images([(16, 16)])[0]
    with pytest.raises(RequestError, match="still loading") as caught:
        asyncio.run(engine.reconstruct(x))
    assert caught.value.status == 503 and not engine.ready
    gate.set()
    assert engine.wait_ready(30)
    assert asyncio.run(engine.reconstruct(x)).image.shape == x.shape
    engine.close()

    (tmp_path / "empty").mkdir()
    broken = Engine(ServeSettings(model=str(tmp_path / "m"), backend="onnxruntime", artifacts=str(tmp_path / "empty")))
    broken.start(background=True)
    deadline = time.monotonic() + 30
    while broken.error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "manifest.json" in broken.error and not broken.ready
    with pytest.raises(RequestError, match="failed to load") as caught:
        asyncio.run(broken.reconstruct(x))
    assert caught.value.status == 503
