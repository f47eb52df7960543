"""``csc bench``: every available backend against eager PyTorch, on the same inputs, in one run.

For each backend, call (encode, decode, reconstruct), batch size and image size: median latency and
images/s, the convolution FLOPs the call runs (counted from the model config by
``csc_serve.export.flops.config_flops``: per pixel of the images, and in all) and the GFLOP/s achieved, set
against this machine's float32 matmul peak measured in the same run. Then the time of one
encode against pixel count up to 1024x1024 with a least-squares fit ``t = a + b * pixels`` (linear cost
means ``a`` small, R^2 near 1, log-log slope near 1). Reconstruction PSNR per backend shows what reduced
precision costs. Prints a table; writes everything as JSON.
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from csc_serve.bench.timing import bench_images, linear_fit, matmul_peak, time_call
from csc_serve.models import psnr

CALLS = ("encode", "decode", "reconstruct")
BENCH_BACKENDS = (
    "torch-eager", "torch-compiled", "torch-bfloat16", "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt",
    "torch-cuda", "torch-cuda-compiled", "torch-cuda-bfloat16",
)


@dataclass
class BenchConfig:
    model: str = "csc-ctrl-rgb"
    backends: tuple[str, ...] = ()  # empty: every available one
    batches: tuple[int, ...] = (1, 8, 32)
    sizes: tuple[int, ...] = (64, 256)
    calls: tuple[str, ...] = CALLS
    scaling_sizes: tuple[int, ...] = (64, 128, 256, 512, 768, 1024)
    min_time: float = 1.0  # seconds of timed calls per case (at least `min_repeats` calls)
    min_repeats: int = 2
    threads: int | None = None
    data: str | None = None  # a folder of images to crop the inputs from (default: seeded synthetic images)
    artifacts: str | None = None
    ablation: bool = False  # also time the target case one optimization at a time (csc_serve.bench.ablation)
    extra: dict[str, Any] = field(default_factory=dict)


def _flops_table(config, calls, batches, sizes) -> dict[tuple[str, int, int], int]:
    """Convolution FLOPs of each timed case, counted from the config (every backend runs the inference form)."""
    from csc_serve.export.flops import config_flops

    return {(call, batch, size): config_flops(config, call, batch, size, size)
            for call in calls for batch in batches for size in sizes}


def _backends(cfg: BenchConfig, model, sha, source, artifacts) -> dict[str, Callable[[], Any]]:
    """Backend label -> constructor, eager torch first (the baseline)."""
    from csc_serve.backends import available_backends, load_backend

    def make(name, **kw):
        return lambda: load_backend(model, name, artifacts=artifacts, threads=cfg.threads, **kw)

    options = {
        "torch-eager": make("torch", device="cpu"),
        "torch-compiled": make("torch", device="cpu", compile=True),
        "torch-bfloat16": make("torch", device="cpu", precision="bfloat16"),
        "onnxruntime-cpu": make("onnxruntime-cpu"),
        "onnxruntime-cuda": make("onnxruntime-cuda"),
        "tensorrt": make("tensorrt"),
        "torch-cuda": make("torch", device="cuda"),
        "torch-cuda-compiled": make("torch", device="cuda", compile=True),
        "torch-cuda-bfloat16": make("torch", device="cuda", precision="bfloat16"),
    }
    if cfg.backends:
        chosen = ["torch-eager", *[b for b in cfg.backends if b != "torch-eager"]]
    else:
        here = available_backends()
        chosen = ["torch-eager"] + [n for n in ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt") if n in here]
    return {name: options[name] for name in chosen}


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from csc_serve.backends import BackendUnavailable, onnx_artifacts
    from csc_serve.backends.onnxruntime_backend import usable_cores
    from csc_serve.model_store import resolve_model

    unknown = sorted(set(cfg.backends) - set(BENCH_BACKENDS))
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; choose from {', '.join(BENCH_BACKENDS)}")
    threads = cfg.threads or usable_cores()
    torch.set_num_threads(threads)
    resolved = resolve_model(cfg.model)
    model, sha, source = resolved.module, resolved.weights_sha256, resolved.name
    config = model.config
    artifacts = onnx_artifacts(model, sha, source, cfg.artifacts or resolved.artifacts)
    peak = matmul_peak(threads)
    log(f"float32 matmul peak: {peak:.1f} GFLOP/s ({threads} threads)")
    flops = _flops_table(config, cfg.calls, cfg.batches, cfg.sizes)
    inputs = {(b, s): bench_images(b, s, config.in_channels, cfg.data) for b in cfg.batches for s in cfg.sizes}
    results: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    references: dict[tuple[int, int], np.ndarray] = {}
    cases = [(call, b, s) for call in cfg.calls for b in cfg.batches for s in cfg.sizes]
    best_name, best_time = None, math.inf
    for name, make in _backends(cfg, model, sha, source, artifacts).items():
        try:
            backend = make()
        except (BackendUnavailable, ImportError, ValueError) as err:
            skipped[name] = str(err)
            log(f"{name}: skipped ({err})")
            continue
        for call, batch, size in tqdm(cases, desc=name, leave=False):
            images = inputs[(batch, size)]
            codes = backend.encode(images) if call == "decode" else None
            fn = {"encode": lambda: backend.encode(images), "decode": lambda: backend.decode(codes),
                  "reconstruct": lambda: backend.reconstruct(images)}[call]
            timing = time_call(fn, cfg.min_time, cfg.min_repeats)
            row = {"backend": name, "call": call, "batch": batch, "size": size, **timing,
                   "images_per_s": batch / timing["median_s"], "latency_ms": 1e3 * timing["median_s"],
                   "conv_gflop": flops[(call, batch, size)] / 1e9,
                   "flops_per_pixel": flops[(call, batch, size)] / (batch * size * size)}
            row["gflops_per_s"] = row["conv_gflop"] / timing["median_s"]
            if call == "reconstruct":
                out = backend.reconstruct(images)
                row["psnr_db"] = psnr(out, images)
                ref = references.setdefault((batch, size), out)
                row["max_abs_diff_vs_eager"] = float(np.abs(out - ref).max())
            results.append(row)
            if (call, batch, size) == ("encode", max(cfg.batches), min(cfg.sizes)) and timing["median_s"] < best_time:
                best_name, best_time = name, timing["median_s"]
    # Measured again after the cases and the higher kept: other load on the machine during the first
    # measurement would otherwise understate the peak and overstate every fraction of it.
    peak = max(peak, matmul_peak(threads))
    log(f"float32 matmul peak after the cases: best {peak:.1f} GFLOP/s")
    for row in results:
        row["fraction_of_peak"] = row["gflops_per_s"] / peak
    scaling = _scaling(cfg, model, artifacts, best_name, config) if best_name and cfg.scaling_sizes else None
    ablation = None
    if cfg.ablation:
        from csc_serve.bench.ablation import run_ablation

        log(f"ablation: encode, batch {max(cfg.batches)}, {min(cfg.sizes)}x{min(cfg.sizes)}")
        ablation = run_ablation(model, sha, max(cfg.batches), min(cfg.sizes), threads, peak, cfg.data,
                                cfg.min_time, cfg.min_repeats)
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "threads": threads, "torch": torch.__version__, "matmul_peak_gflops": peak},
        "model": {"source": source, "weights_sha256": sha, "num_steps": [s.num_steps for s in config.stages]},
        "config": {k: v for k, v in cfg.__dict__.items() if k != "extra"},
        "results": results,
        "skipped": skipped,
        "scaling": scaling,
        "ablation": ablation,
        "flops_per_pixel": {call: {str(size): flops[(call, cfg.batches[0], size)] / (cfg.batches[0] * size * size)
                                   for size in cfg.sizes} for call in cfg.calls},
        "summary": _summary(results, cfg, peak),
    }


def _scaling(cfg: BenchConfig, model, artifacts, name: str, config) -> dict[str, Any]:
    from csc_serve.backends import load_backend

    backend_name = {"torch-eager": "torch", "torch-compiled": "torch"}.get(name, name)
    backend = load_backend(model, backend_name, artifacts=artifacts, threads=cfg.threads)
    points = []
    for size in cfg.scaling_sizes:
        images = bench_images(1, size, config.in_channels, cfg.data, seed=1)
        timing = time_call(lambda: backend.encode(images), cfg.min_time, cfg.min_repeats)
        points.append({"size": size, "pixels": size * size, **timing})
    fit = linear_fit([p["pixels"] for p in points], [p["median_s"] for p in points])
    return {"backend": name, "call": "encode", "batch": 1, "points": points, "fit": fit}


def _summary(results: list[dict], cfg: BenchConfig, peak: float) -> dict[str, Any]:
    """The target case: encode, largest batch, smallest size; best backend against eager torch."""
    key = ("encode", max(cfg.batches), min(cfg.sizes))
    rows = [r for r in results if (r["call"], r["batch"], r["size"]) == key]
    eager = next((r for r in rows if r["backend"] == "torch-eager"), None)
    best = min(rows, key=lambda r: r["median_s"], default=None)
    if not eager or not best:
        return {}
    return {"case": {"call": key[0], "batch": key[1], "size": key[2]}, "best_backend": best["backend"],
            "speedup_vs_eager": eager["median_s"] / best["median_s"], "best_gflops_per_s": best["gflops_per_s"],
            "best_fraction_of_peak": best["gflops_per_s"] / peak}


def format_table(report: dict[str, Any]) -> str:
    head = (f"{'backend':<20} {'call':<12} {'batch':>5} {'size':>5} {'ms':>10} {'img/s':>9} {'kFLOP/px':>9} "
            f"{'GFLOP/s':>8} {'%peak':>6} {'PSNR':>6}")
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        psnr_text = f"{r['psnr_db']:6.2f}" if "psnr_db" in r else ""
        lines.append(
            f"{r['backend']:<20} {r['call']:<12} {r['batch']:>5} {r['size']:>5} {r['latency_ms']:>10.2f} "
            f"{r['images_per_s']:>9.1f} {r['flops_per_pixel'] / 1e3:>9.1f} {r['gflops_per_s']:>8.1f} "
            f"{100 * r['fraction_of_peak']:>5.1f}% {psnr_text:>6}"
        )
    peak = report["machine"]["matmul_peak_gflops"]
    lines.append(f"float32 matmul peak {peak:.1f} GFLOP/s on {report['machine']['threads']} threads")
    if report.get("scaling"):
        s = report["scaling"]
        pts = ", ".join(f"{p['size']}^2 {1e3 * p['median_s']:.1f} ms" for p in s["points"])
        fit = s["fit"]
        lines.append(f"scaling ({s['backend']} encode, batch 1): {pts}")
        lines.append(
            f"  fit t = {1e3 * fit['intercept_s']:.2f} ms + {1e3 * fit['seconds_per_megapixel']:.1f} ms/Mpixel, "
            f"R^2 {fit['r2']:.4f}, log-log slope {fit['loglog_slope']:.3f}"
        )
    if report.get("summary"):
        s = report["summary"]
        c = s["case"]
        lines.append(
            f"{c['call']} batch {c['batch']} {c['size']}x{c['size']}: best {s['best_backend']} "
            f"{s['speedup_vs_eager']:.2f}x eager torch, {s['best_gflops_per_s']:.1f} GFLOP/s = "
            f"{100 * s['best_fraction_of_peak']:.1f}% of matmul peak"
        )
    for row in report.get("ablation") or []:
        if "median_s" in row:
            lines.append(f"  {row['variant']:<58} {1e3 * row['median_s']:>9.1f} ms {row['gflops_per_s']:>6.1f} GFLOP/s "
                         f"{100 * row['fraction_of_peak']:>5.1f}% peak {row['speedup_vs_baseline']:>5.2f}x")
        else:
            lines.append("  " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else str(v) for k, v in row.items()))
    for name, reason in report.get("skipped", {}).items():
        lines.append(f"skipped {name}: {reason}")
    return "\n".join(lines)
