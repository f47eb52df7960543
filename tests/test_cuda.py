"""The CUDA paths: torch backends on the GPU (eager, compiled, bfloat16) against eager PyTorch on the CPU,
`csc bench` on the CUDA backends, and training steps on the GPU. They need a CUDA device; `make gpu-check`
runs them on one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from csc_serve.backends import load_backend
from csc_serve.bench.backends import BenchConfig, run_bench
from csc_serve.models import CSCAutoencoder, load_pretrained
from csc_serve.models.calibration import scale_for_sigma
from csc_serve.training.presets import PRESETS
from csc_serve.training.run import train

from .conftest import tiny_config
from .test_backends import _inputs
from .test_training import tiny_run, weights, write_image_folder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# cuDNN runs float32 convolutions on TensorFloat-32 by default (10 bits of mantissa): through the unrolled
# steps a reconstruction of a [0, 1] image moves by a few 1e-3 against the CPU.
TF32_TOL = 2e-2
BF16_TOL = 0.1


@pytest.fixture(params=[{}, {"shift_average": True, "nonnegative": False}], ids=["plain", "shift-average"])
def model(request) -> CSCAutoencoder:
    torch.manual_seed(0)
    return CSCAutoencoder(tiny_config(**request.param)).eval()


def _calls(backend, images, scale, codes=None):
    encoded = backend.encode(images, scale)
    return {"encode": encoded, "decode": backend.decode(encoded if codes is None else codes),
            "reconstruct": backend.reconstruct(images, scale)}


@pytest.mark.parametrize("options,tol", [({}, TF32_TOL), ({"compile": True}, TF32_TOL),
                                         ({"precision": "bfloat16"}, BF16_TOL)],
                         ids=["eager", "compiled", "bfloat16"])
def test_cuda_backends_agree_with_eager_cpu(model, options, tol):
    images, scale = _inputs()
    cpu = _calls(load_backend(model, "torch", device="cpu"), images, scale)
    gpu_backend = load_backend(model, "torch", device="cuda", **options)
    assert gpu_backend.device == "cuda"
    gpu = _calls(gpu_backend, images, scale, codes=cpu["encode"])
    for call, ref in cpu.items():
        assert gpu[call].shape == ref.shape and gpu[call].dtype == np.float32, call
        np.testing.assert_allclose(gpu[call], ref, atol=tol, rtol=0, err_msg=call)


def test_the_bundled_model_denoises_alike_on_cuda_and_cpu():
    """The shipped model (learned steps and thresholds, shift averaging) on a real-sized input."""
    model = load_pretrained("csc-ctrl-rgb")
    gen = np.random.default_rng(1)
    clean = gen.random((1, 3, 96, 96), dtype=np.float32)
    noisy = (clean + gen.normal(0, 25 / 255, clean.shape)).astype(np.float32)
    scale = np.asarray(scale_for_sigma(model.config.noise_calibration, [25.0]), np.float32)
    cpu = load_backend(model, "torch", device="cpu").reconstruct(noisy, scale)
    gpu = load_backend(model, "torch", device="cuda").reconstruct(noisy, scale)
    np.testing.assert_allclose(gpu, cpu, atol=TF32_TOL, rtol=0)


def test_bench_runs_every_cuda_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("CSC_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    CSCAutoencoder(tiny_config()).eval().save_pretrained(tmp_path / "model")
    names = ("torch-cuda", "torch-cuda-compiled", "torch-cuda-bfloat16")
    cfg = BenchConfig(model=str(tmp_path / "model"), backends=names, batches=(1, 4), sizes=(32,),
                      scaling_sizes=(32, 64), min_time=0.0, min_repeats=2)
    report = run_bench(cfg, log=lambda line: None)
    assert not report.get("skipped"), report.get("skipped")
    rows = report["results"]
    assert sorted({r["backend"] for r in rows}) == sorted(("torch-eager", *names))
    for r in rows:
        assert r["median_s"] > 0 and r["images_per_s"] > 0
        if r["call"] == "reconstruct" and r["backend"] != "torch-eager":
            assert r["max_abs_diff_vs_eager"] < (BF16_TOL if "bfloat16" in r["backend"] else TF32_TOL)
    json.dumps(report)  # the report is written as JSON


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16-autocast"])
def test_training_runs_and_resumes_on_cuda(tmp_path, bf16):
    data = write_image_folder(tmp_path / "data")
    out = tmp_path / "m"
    train(tiny_run(data, out, iterations=2, device="cuda", bf16=bf16), PRESETS["tiny"], progress=False)
    first = weights(out)
    train(tiny_run(data, out, iterations=4, device="cuda", bf16=bf16), resume=True, progress=False)
    model = load_pretrained(out)
    provenance = model.config.provenance
    assert provenance["device"].startswith("cuda") and provenance["bf16"] == bf16
    assert provenance["checkpoint_step"] == 4
    last = weights(out)
    assert all(torch.isfinite(w).all() for w in last)
    assert any(not torch.equal(a, b) for a, b in zip(first, last))  # the two resumed steps moved the atoms
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4 and np.isfinite(records[-1]["pixel_mse"])
