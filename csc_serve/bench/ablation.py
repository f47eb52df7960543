"""One case (encode, default batch 32 at 64x64), one change at a time: what each optimization buys.

Variants: eager torch in the training form of FISTA (the baseline); in the folded form (``eta`` folded
into the analysis weights, the residual formed on the image channels, soft threshold as ``v - clip(v, -t, t)``
with per-sample, per-atom thresholds, the Gram step of a 1x1 stage as one matrix); in the inference form
(folded, plus the scale moved onto the input and codes and the per-atom weights into the dictionary, so one
constant threshold: one Clip node); channels-last; ``torch.compile`` without and with freezing; bfloat16
(with its PSNR cost). ONNX Runtime on graphs exported in each form, at each graph optimization level, with 1
and all threads, with and without spinning threads, and batches split over one single-threaded session per
core. GFLOP/s counts each variant's own convolutions (``config_flops`` in the variant's form).
"""

from __future__ import annotations

import copy
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _torch_variants(model, images, scale, threads) -> dict[str, Callable[[], Callable[[], Any]]]:
    import torch

    from csc_serve.models import fista_form

    x, s = torch.from_numpy(images), torch.from_numpy(scale)

    def eager(form, channels_last=False, dtype=torch.float32):
        def setup():
            m = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
            xx = x.to(dtype)
            if channels_last:
                xx = xx.contiguous(memory_format=torch.channels_last)

            def call():
                with torch.inference_mode(), fista_form(form):
                    return m.encode(xx, s.to(dtype)).float()

            return call
        return setup

    def compiled(freezing):
        def setup():
            import torch._inductor.config as inductor_config

            fn = torch.compile(model.encode, dynamic=False)

            def call():
                with torch.inference_mode(), inductor_config.patch(freezing=freezing):
                    return fn(x, s)

            return call
        return setup

    return {
        "torch eager, training form (baseline)": eager("training"),
        "torch eager, folded form": eager("folded"),
        "torch eager, inference form (folded + rescaled)": eager("inference"),
        "torch eager, inference form, channels-last": eager("inference", channels_last=True),
        "torch.compile (inductor)": compiled(False),
        "torch.compile (inductor, freezing)": compiled(True),
        "torch eager bfloat16, inference form": eager("inference", dtype=torch.bfloat16),
    }


def _ort_variants(paths: dict[str, Path], images, scale, threads) -> dict[str, Callable[[], Callable[[], Any]]]:
    import onnxruntime as ort

    levels = ort.GraphOptimizationLevel
    feeds = {"images": images, "lmbda_scale": scale}

    def make_session(form, level, n, spin=True):
        options = ort.SessionOptions()
        options.intra_op_num_threads = n
        options.inter_op_num_threads = 1
        options.graph_optimization_level = level
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        return ort.InferenceSession(str(paths[form]), options, providers=["CPUExecutionProvider"])

    def session(form, level, n, spin=True):
        def setup():
            sess = make_session(form, level, n, spin)
            return lambda: sess.run(None, feeds)[0]
        return setup

    def workers(level, count, chunk):
        """``count`` single-threaded sessions, each taking ``chunk`` images at a time (the backend's scheme)."""
        def setup():
            pool = ThreadPoolExecutor(count)
            sessions = [make_session("inference", level, 1) for _ in range(count)]
            batch = images.shape[0]

            def work(worker):
                return [sessions[worker].run(None, {k: v[i : i + chunk] for k, v in feeds.items()})[0]
                        for i in range(worker * chunk, batch, count * chunk)]

            return lambda: list(pool.map(work, range(count)))
        return setup

    out = {f"onnxruntime, training-form graph, ORT_ENABLE_ALL, {threads} threads":
           session("training", levels.ORT_ENABLE_ALL, threads),
           f"onnxruntime, folded-form graph, ORT_ENABLE_EXTENDED, {threads} threads":
           session("folded", levels.ORT_ENABLE_EXTENDED, threads)}
    for name in ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"):
        out[f"onnxruntime, {name}, {threads} threads"] = session("inference", getattr(levels, name), threads)
    out["onnxruntime, ORT_ENABLE_EXTENDED, 1 thread"] = session("inference", levels.ORT_ENABLE_EXTENDED, 1)
    out[f"onnxruntime, ORT_ENABLE_EXTENDED, {threads} threads, no spinning"] = session(
        "inference", levels.ORT_ENABLE_EXTENDED, threads, spin=False)
    if threads > 1:
        for chunk in (8, 2, 1):
            out[f"onnxruntime, {threads} 1-thread sessions, {chunk} image(s) per call"] = workers(
                levels.ORT_ENABLE_EXTENDED, threads, chunk)
        out[f"onnxruntime, {threads} 1-thread sessions, 1 image per call, ORT_ENABLE_ALL"] = workers(
            levels.ORT_ENABLE_ALL, threads, 1)
    return out


def run_ablation(model, sha: str, batch: int, size: int, threads: int, peak: float, data: str | None,
                 min_time: float, min_repeats: int) -> list[dict[str, Any]]:
    from csc_serve.bench.timing import bench_images, time_call
    from csc_serve.export.flops import config_flops
    from csc_serve.export.onnx_export import export_onnx
    from csc_serve.models import fista_form

    images = bench_images(batch, size, model.config.in_channels, data)
    scale = np.ones(batch, np.float32)
    s = model.config.total_stride
    aligned = s * -(-size // s)
    images = np.pad(images, ((0, 0), (0, 0), (0, aligned - size), (0, aligned - size)), mode="edge")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths, flops = {}, {}
        for form in ("training", "folded", "inference"):
            with fista_form(form):
                export_onnx(model, Path(tmp) / form, weights_sha256=sha, graphs=("encode", "reconstruct"))
            paths[form] = Path(tmp) / form / "encode.onnx"
            flops[form] = config_flops(model.config, "encode", batch, aligned, aligned, form)
        variants = {**_torch_variants(model, images, scale, threads), **_ort_variants(paths, images, scale, threads)}
        for name, setup in variants.items():
            call = setup()
            timing = time_call(call, min_time, min_repeats)
            form = next((f for f in ("training", "folded") if f"{f} form" in name or f"{f}-form" in name), "inference")
            gflops = flops[form] / 1e9 / timing["median_s"]
            rows.append({"variant": name, **timing, "images_per_s": batch / timing["median_s"],
                         "conv_gflop": flops[form] / 1e9, "gflops_per_s": gflops, "fraction_of_peak": gflops / peak})
        rows += _bfloat16_cost(model, images, data)
    base = rows[0]["median_s"]
    for row in rows:
        if "median_s" in row:
            row["speedup_vs_baseline"] = base / row["median_s"]
    return rows


def _bfloat16_cost(model, images, data) -> list[dict[str, Any]]:
    """Reconstruction PSNR (and sigma-25 denoising PSNR, when the model is calibrated) in float32 and bfloat16."""
    import torch

    from csc_serve.models import psnr

    x = torch.from_numpy(images)
    out = {}
    noisy = x + 25 / 255 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        m = copy.deepcopy(model).to(dtype)
        with torch.inference_mode():
            out[name] = {"reconstruct_psnr_db": psnr(m.reconstruct(x.to(dtype)).float().numpy(), images)}
            if model.config.noise_calibration is not None:
                denoised = m.denoise(noisy.to(dtype), sigma=25.0).float().numpy()
                out[name]["denoise_sigma25_psnr_db"] = psnr(denoised, images)
    source = "given images" if data else "synthetic images"
    return [{"variant": f"precision cost on {source}", **{f"{k}_{n}": v for n in out for k, v in out[n].items()}}]
