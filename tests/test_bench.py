import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from csc_serve.bench.backends import BenchConfig, bench_images, format_table, linear_fit, run_bench
from csc_serve.cli.main import main
from csc_serve.models import CSCAutoencoder

from .conftest import tiny_config


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CSC_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    CSCAutoencoder(tiny_config()).eval().save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_linear_fit_recovers_a_line_and_its_log_slope():
    pixels = [4096, 16384, 65536, 262144]
    fit = linear_fit(pixels, [1e-3 + 2e-8 * p for p in pixels])
    assert fit["intercept_s"] == pytest.approx(1e-3, rel=1e-6)
    assert fit["seconds_per_megapixel"] == pytest.approx(0.02, rel=1e-6)
    assert fit["r2"] == pytest.approx(1.0)
    assert linear_fit(pixels, [3e-8 * p for p in pixels])["loglog_slope"] == pytest.approx(1.0)
    assert linear_fit(pixels, [1e-12 * p * p for p in pixels])["loglog_slope"] == pytest.approx(2.0)


def test_bench_images_are_seeded_crops_of_the_data(tmp_path):
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(tmp_path / "a.png")
    crops = bench_images(3, 32, 3, str(tmp_path))
    assert crops.shape == (3, 3, 32, 32) and crops.dtype == np.float32
    np.testing.assert_allclose(crops, 200 / 255)
    synthetic = bench_images(2, 16, 3, None)
    np.testing.assert_array_equal(synthetic, bench_images(2, 16, 3, None))
    assert 0 <= synthetic.min() and synthetic.max() <= 1


def test_bench_times_every_backend_call_batch_and_size(model_dir):
    cfg = BenchConfig(model=str(model_dir), batches=(1, 2), sizes=(16, 24), scaling_sizes=(16, 32, 48),
                      min_time=0.0, min_repeats=1, threads=1)
    report = run_bench(cfg, log=lambda line: None)
    rows = report["results"]
    backends = sorted({r["backend"] for r in rows})
    assert backends == ["onnxruntime-cpu", "torch-eager"]
    assert len(rows) == 2 * 3 * 2 * 2  # backends x calls x batches x sizes
    for r in rows:
        assert r["median_s"] > 0 and r["images_per_s"] == pytest.approx(r["batch"] / r["median_s"])
        assert r["conv_gflop"] > 0 and r["gflops_per_s"] == pytest.approx(r["conv_gflop"] / r["median_s"])
    # The same inputs for every backend: ONNX Runtime reconstructs what eager torch does.
    for r in rows:
        if r["call"] == "reconstruct" and r["backend"] == "onnxruntime-cpu":
            assert r["max_abs_diff_vs_eager"] < 1e-4
    # FLOPs grow with the batch: twice the images, twice the convolutions.
    by_key = {(r["backend"], r["call"], r["batch"], r["size"]): r["conv_gflop"] for r in rows}
    assert by_key[("torch-eager", "encode", 2, 24)] == pytest.approx(2 * by_key[("torch-eager", "encode", 1, 24)])
    assert report["machine"]["matmul_peak_gflops"] > 0
    assert [p["size"] for p in report["scaling"]["points"]] == [16, 32, 48]
    assert report["summary"]["case"] == {"call": "encode", "batch": 2, "size": 16}
    assert report["summary"]["speedup_vs_eager"] > 0
    table = format_table(report)
    assert "onnxruntime-cpu" in table and "matmul peak" in table and "log-log slope" in table


def test_csc_bench_prints_a_table_and_writes_json(model_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", str(model_dir), "--batches", "1", "--sizes", "16", "--calls", "encode", "--no-scaling",
                 "--min-time", "0", "--threads", "1", "--json", str(out)])
    assert code == 0
    assert "torch-eager" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert {r["call"] for r in report["results"]} == {"encode"} and report["scaling"] is None


@pytest.mark.parametrize(
    "args,message",
    [(["--batches", "0"], "positive integers"), (["--calls", "train"], "unknown call"),
     (["--backends", "openvino"], "unknown backend")],
)
def test_csc_bench_bad_arguments_give_one_line(args, message, model_dir):
    result = subprocess.run([sys.executable, "-m", "csc_serve.cli", "bench", str(model_dir), "--no-scaling", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


def test_ablation_times_every_variant_on_the_same_case(model_dir):
    from csc_serve.bench.ablation import run_ablation
    from csc_serve.models.serialization import weights_sha256

    model = CSCAutoencoder.from_pretrained(model_dir)
    rows = run_ablation(model, weights_sha256(model), batch=2, size=16, threads=2, peak=100.0, data=None,
                        min_time=0.0, min_repeats=1)
    timed = [r for r in rows if "median_s" in r]
    names = [r["variant"] for r in timed]
    assert names[0] == "torch eager, training form (baseline)" and timed[0]["speedup_vs_baseline"] == 1.0
    for expected in ("folded form", "torch.compile", "bfloat16", "ORT_ENABLE_EXTENDED", "1-thread sessions"):
        assert any(expected in n for n in names), expected
    for r in timed:
        assert r["median_s"] > 0 and r["conv_gflop"] > 0
        assert r["fraction_of_peak"] == pytest.approx(r["gflops_per_s"] / 100.0)
    # Folding eta into the weights and rescaling change no convolution: the same FLOPs in both forms.
    flops = {n: r["conv_gflop"] for n, r in zip(names, timed)}
    assert flops["torch eager, folded form"] == pytest.approx(flops["torch eager, inference form (folded + rescaled)"])
    cost = rows[-1]
    assert cost["variant"].startswith("precision cost") and cost["reconstruct_psnr_db_bfloat16"] > 0
