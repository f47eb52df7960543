import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from csc_serve.bench.backends import BenchConfig, format_table, run_bench
from csc_serve.bench.timing import bench_images, linear_fit
from csc_serve.cli.main import main
from csc_serve.export.flops import config_flops, conv_flops
from csc_serve.models import CSCAutoencoder, CSCConfig, StageConfig, fista_form, load_pretrained

from .conftest import tiny_config

CALLS = ("encode", "decode", "reconstruct")


@pytest.fixture
def model_dir(tmp_path, monkeypatch, one_torch_thread):
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
        assert r["flops_per_pixel"] == pytest.approx(1e9 * r["conv_gflop"] / (r["batch"] * r["size"] ** 2))
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
    assert set(report["flops_per_pixel"]) == set(CALLS)
    table = format_table(report)
    assert "onnxruntime-cpu" in table and "matmul peak" in table and "log-log slope" in table and "kFLOP/px" in table


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


# ----------------------------------------------------------------------------- FLOPs counted from the config
def _one_by_one(padding_mode: str = "zeros") -> CSCConfig:
    """Both kinds of stage: a strided k x k, then a 1x1 whose Gram step is one matrix in the inference form."""
    return CSCConfig(padding_mode=padding_mode, nonnegative=False,
                     stages=(StageConfig(num_atoms=6, kernel_size=5, stride=2, num_steps=3),
                             StageConfig(num_atoms=5, kernel_size=1, stride=1, num_steps=3)))


def test_config_flops_match_the_onnx_graphs(tmp_path, one_torch_thread):
    """Where ONNX shape inference gives concrete shapes, the graph's own count agrees. It does not through the
    replicate (shift averaging) or circular pads the tracer writes: torch's counter checks those models below."""
    from csc_serve.export.onnx_export import export_onnx

    config = _one_by_one()
    torch.manual_seed(0)
    model = CSCAutoencoder(config).eval()
    export_onnx(model, tmp_path / "inference", weights_sha256="0" * 64)
    with fista_form("training"):
        export_onnx(model, tmp_path / "training", weights_sha256="0" * 64, graphs=("encode",))
    # 15 x 10 images are padded to 16 x 10 (the total stride, 2) before the graphs see them.
    shapes = {"images": (2, 3, 16, 10), "lmbda_scale": (2,), "codes": (2, 5, 8, 5)}
    for call in CALLS:
        assert config_flops(config, call, 2, 15, 10) == conv_flops(tmp_path / "inference" / f"{call}.onnx", shapes)
    training = config_flops(config, "encode", 2, 15, 10, form="training")
    assert training == conv_flops(tmp_path / "training" / "encode.onnx", shapes)
    assert training > config_flops(config, "encode", 2, 15, 10)  # the 1x1 Gram step as one matrix is cheaper


def _torch_conv_flops(model, call, images, form) -> int:
    """FLOPs of the convolutions eager torch runs for ``call`` (torch's own counter, 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), fista_form(form):
        codes = model.encode(images)
        with FlopCounterMode(display=False) as counter:
            {"encode": lambda: model.encode(images), "decode": lambda: model.decode(codes),
             "reconstruct": lambda: model.reconstruct(images)}[call]()
    return sum(n for op, n in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))


@pytest.mark.parametrize("name", ["tiny", "one-by-one", "circular", "tiny-shift-averaged", "csc-ctrl-rgb"])
def test_config_flops_count_the_convolutions_torch_runs(name, one_torch_thread):
    """Shift-averaged models too (their ONNX reconstruct graph has no concrete inner shapes): torch's own
    count of the convolutions it runs, in both forms, at a size off the stride grid."""
    if name == "csc-ctrl-rgb":
        model = load_pretrained(name)
    else:
        config = {"tiny": tiny_config(), "one-by-one": _one_by_one(), "circular": _one_by_one("circular"),
                  "tiny-shift-averaged": tiny_config(shift_average=True)}[name]
        torch.manual_seed(0)
        model = CSCAutoencoder(config).eval()
    images = torch.rand(2, 3, 9, 14, generator=torch.Generator().manual_seed(0))
    for form in ("training", "inference"):
        for call in CALLS:
            expected = _torch_conv_flops(model, call, images, form)
            assert config_flops(model.config, call, 2, 9, 14, form=form) == expected, (form, call)
    s = model.config.total_stride
    if model.config.shift_average:  # one copy of (encode + decode) per shift, one stride larger
        per_copy = (config_flops(model.config, "encode", 2, 9 + s, 14 + s)
                    + config_flops(model.config, "decode", 2, 9 + s, 14 + s))
        assert config_flops(model.config, "reconstruct", 2, 9, 14) == len(model.config.shifts) * per_copy


def test_config_flops_reject_unknown_calls_and_forms():
    with pytest.raises(ValueError, match="unknown call"):
        config_flops(tiny_config(), "denoise", 1, 8, 8)
    with pytest.raises(ValueError, match="unknown form"):
        config_flops(tiny_config(), "encode", 1, 8, 8, form="fast")


# ----------------------------------------------------------------------------- csc bench on every model we ship
@pytest.fixture
def shift_averaged_dir(tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setenv("CSC_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    CSCAutoencoder(tiny_config(shift_average=True)).eval().save_pretrained(tmp_path / "shift-averaged")
    return tmp_path / "shift-averaged"


@pytest.mark.parametrize("which", ["csc-ctrl-rgb", "shift-averaged"])
def test_csc_bench_runs_every_call_on_shift_averaged_models(which, shift_averaged_dir, tmp_path, monkeypatch, capsys):
    """The bundled model and a tiny shift-averaged one: every call, eager torch and ONNX Runtime, FLOPs per pixel."""
    import csc_serve.bench.backends as backends

    # The 2048^2 matmul peak takes seconds per measurement; the FLOP counts and the calls are what is tested here.
    monkeypatch.setattr(backends, "matmul_peak", lambda threads: 100.0)
    model = "csc-ctrl-rgb" if which == "csc-ctrl-rgb" else str(shift_averaged_dir)
    out = tmp_path / "bench.json"
    code = main(["bench", model, "--calls", ",".join(CALLS), "--batches", "1", "--sizes", "8", "--no-scaling",
                 "--min-time", "0", "--threads", "1", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "kFLOP/px" in table and "error" not in table
    report = json.loads(out.read_text())
    config = load_pretrained(model).config
    assert config.shift_average
    rows = {(r["backend"], r["call"]): r for r in report["results"]}
    assert set(rows) == {(b, c) for b in ("torch-eager", "onnxruntime-cpu") for c in CALLS}
    for (_, call), row in rows.items():
        assert row["flops_per_pixel"] == config_flops(config, call, 1, 8, 8) / 64
        assert report["flops_per_pixel"][call]["8"] == row["flops_per_pixel"]
    # Shift averaging runs encode and decode on one copy per shift (all S^2, or fewer), each one stride larger.
    s = config.total_stride
    assert rows[("torch-eager", "reconstruct")]["flops_per_pixel"] == pytest.approx(
        len(config.shifts) * (8 + s) ** 2 / 64 * (rows[("torch-eager", "encode")]["flops_per_pixel"]
                                     + rows[("torch-eager", "decode")]["flops_per_pixel"]))
    assert rows[("onnxruntime-cpu", "reconstruct")]["max_abs_diff_vs_eager"] < 1e-4


def test_csc_bench_compares_several_models_on_the_same_cases(model_dir, tmp_path, monkeypatch, capsys):
    import csc_serve.bench.backends as backends

    monkeypatch.setattr(backends, "matmul_peak", lambda threads: 100.0)
    stages = tuple(dataclasses.replace(s, num_steps=2 * s.num_steps) for s in tiny_config().stages)
    torch.manual_seed(0)
    CSCAutoencoder(tiny_config(stages=stages)).eval().save_pretrained(tmp_path / "more-steps")
    out = tmp_path / "bench.json"
    code = main(["bench", str(model_dir), str(tmp_path / "more-steps"), "--batches", "1", "--sizes", "16",
                 "--calls", "encode,reconstruct", "--no-scaling", "--min-time", "0", "--threads", "1",
                 "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "[1] " + str(tmp_path / "more-steps") in printed and "x [0]" in printed
    report = json.loads(out.read_text())
    first, second = report["models"]
    assert [first["model"]["num_steps"], second["model"]["num_steps"]] == [[4, 3], [8, 6]]
    rows = {(r["backend"], r["call"]): r for r in report["comparison"]}
    assert set(rows) == {(b, c) for b in ("torch-eager", "onnxruntime-cpu") for c in ("encode", "reconstruct")}
    for (backend, call), row in rows.items():
        mine = [next(r for r in rep["results"] if (r["backend"], r["call"]) == (backend, call))
                for rep in (first, second)]
        assert [m["median_s"] for m in row["models"]] == [r["median_s"] for r in mine]
        assert row["models"][1]["ratio_to_first"] == pytest.approx(mine[1]["median_s"] / mine[0]["median_s"])
        assert row["models"][0]["ratio_to_first"] == 1.0
        # Twice the FISTA steps: more convolution work per pixel, as the config counts it.
        assert row["models"][1]["flops_per_pixel"] > row["models"][0]["flops_per_pixel"]


def test_several_models_are_refused_where_one_is_benchmarked(model_dir):
    result = subprocess.run([sys.executable, "-m", "csc_serve.cli", "bench", str(model_dir), str(model_dir),
                             "--http"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "several models" in result.stderr and "Traceback" not in result.stderr
