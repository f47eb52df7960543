"""Unrolled FISTA to ONNX: ``encode``, ``decode`` and ``reconstruct`` graphs, each checked against torch.

Every graph is traced from the model itself (``csc_serve.export.graphs``), with dynamic batch, height and width,
written as one self-contained file, passed through ``onnx.checker``, and run in ONNX Runtime against the
torch model before it is kept: two image sizes, two ``lmbda_scale`` values that must give different codes
(and for noise-adaptive models two ``sigma`` values in each batch), codes and images within
``PARITY_TOLERANCE`` of torch's, zero counts differing on at most ``COUNT_FLIP_TOLERANCE`` of the codes. A
graph that fails is not written.

Opset 17: every runtime we target reads it (ONNX Runtime 1.18+, the TensorRT 10 and 11 ONNX parsers), and
the graphs need nothing newer (Conv, ConvTranspose, elementwise arithmetic, Min/Max, Pad, Slice, Concat).
The TorchScript tracer exports them: the unrolled solver is straight-line code, and the tracer records
dynamic axes without the shape guards ``torch.export`` would need for "height is a multiple of the stride".
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from csc_serve.models import CSCAutoencoder
from csc_serve.models.autoencoder import zero_map
from csc_serve.models.serialization import atomic_write, sha256_file

from .graphs import GRAPH_NAMES, dynamic_axes, graph_signature, io_shapes
from .manifest import (
    FORMAT,
    FORMAT_VERSION,
    GRAPH_REVISION,
    ExportError,
    config_sha256,
    library_versions,
    utc_now,
    write_manifest,
)

OPSET = 17
# float32 rounding through 10-20 unrolled steps stays near 1e-6; 1e-4 leaves room for other CPUs' kernels.
PARITY_TOLERANCE = 1e-4
PARITY_SCALES = (1.0, 3.0)
# Zero counts may differ where a code lies within float rounding of its threshold: a few per thousand codes.
COUNT_FLIP_TOLERANCE = 1e-3
# Noise levels (0..255) of the two images of every parity case, read by noise-adaptive models only.
PARITY_SIGMAS = (0.0, 30.0)





def _example_sizes(stride: int) -> list[tuple[int, int]]:
    """Two stride-aligned sizes, neither square, so a transposed height/width shows up."""
    def align(n: int) -> int:
        return stride * max(2, -(-n // stride))

    return [(align(24), align(40)), (align(48), align(32))]


def _onnx_session(path: str | os.PathLike, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _trace(module: torch.nn.Module, args: tuple, path: str, inputs: list[dict], outputs: list[dict], opset: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on constant shapes and its own deprecation
        torch.onnx.export(
            module,
            args,
            path,
            dynamo=False,
            opset_version=opset,
            input_names=[s["name"] for s in inputs],
            output_names=[s["name"] for s in outputs],
            dynamic_axes=dynamic_axes(inputs + outputs),
            do_constant_folding=True,
        )


def _check_self_contained(directory: Path, before: set[str]) -> None:
    stray = sorted(set(os.listdir(directory)) - before)
    if stray:
        raise ExportError(f"the exporter wrote external data files {stray}: the model is too large for one file")


def _parity_cases(model: CSCAutoencoder, graph: str) -> list[dict[str, Any]]:
    """Inputs for ``graph`` at two sizes and two scales (and, for a noise-adaptive model, two noise levels per
    batch), with the torch float32 reference of every output."""
    gen = torch.Generator().manual_seed(0)
    config = model.config
    lo, hi = config.value_range
    _, inputs, _ = graph_signature(config, graph)
    cases = []
    for h, w in _example_sizes(config.total_stride):
        images = lo + (hi - lo) * torch.rand(2, config.in_channels, h, w, generator=gen)
        for scale in PARITY_SCALES:
            lmbda = torch.full((2,), scale)
            sigma = torch.tensor(PARITY_SIGMAS)
            with torch.no_grad():
                stages = model.encode(images, lmbda, all_stages=True, sigma=sigma)
                codes = stages[-1]
                if graph == "encode":
                    refs = [codes, *(zero_map(z) for z in stages[:-1])]
                elif graph == "decode":
                    refs = [model.decode(codes)]
                else:
                    refs = list(model.reconstruct_counting(images, lmbda, sigma=sigma))
            feeds = {"codes": codes} if graph == "decode" else {"images": images, "lmbda_scale": lmbda, "sigma": sigma}
            feeds = {spec["name"]: feeds[spec["name"]] for spec in inputs}
            cases.append({"size": [h, w], "lmbda_scale": scale, "feeds": feeds, "refs": refs, "codes": codes})
    return cases


def _measure_parity(path: str, cases: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """The largest difference between ONNX Runtime and torch over the image and code outputs of every case,
    and the share of zero counts that differ. A count is a number of exact zeros: a code within float rounding
    of its threshold may be zero in one runtime and not in the other, so counts are compared in total, not
    value by value."""
    session = _onnx_session(path)
    errors = []
    for case in cases:
        feeds = {k: v.numpy() for k, v in case["feeds"].items()}
        outs = session.run(None, feeds)
        if len(outs) != len(case["refs"]):
            raise ExportError(f"{Path(path).name}: {len(outs)} outputs, torch gives {len(case['refs'])}")
        error, flips, counted = 0.0, 0.0, 0
        for name, out, ref in zip(names, outs, case["refs"]):
            ref = ref.numpy()
            if out.shape != ref.shape:
                raise ExportError(f"{Path(path).name}: output {name} has shape {out.shape}, torch {ref.shape}")
            if name.endswith("zeros"):
                flips += float(np.abs(out - ref).sum())
                counted += int(ref.size)
            else:
                error = max(error, float(np.abs(out - ref).max()))
        errors.append({"size": case["size"], "lmbda_scale": case["lmbda_scale"], "max_abs_error": error,
                       "zero_count_flips": flips})
    return {"max_abs_error": max(e["max_abs_error"] for e in errors),
            "zero_count_flips": sum(e["zero_count_flips"] for e in errors), "cases": errors}


def _export_graph(
    model: CSCAutoencoder,
    graph: str,
    directory: Path,
    file_name: str,
    opset: int,
    cases: list[dict[str, Any]],
    tolerance: float | None,
) -> dict[str, Any]:
    import onnx

    module_cls, inputs, outputs = graph_signature(model.config, graph)
    module = module_cls(model).eval()
    args = tuple(cases[0]["feeds"][s["name"]] for s in inputs)
    before = set(os.listdir(directory))
    fd, tmp = tempfile.mkstemp(prefix=f".{file_name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        _trace(module, args, tmp, inputs, outputs, opset)
        _check_self_contained(directory, before | {Path(tmp).name})
        onnx.checker.check_model(tmp, full_check=True)
        parity = _measure_parity(tmp, cases, [spec["name"] for spec in outputs])
        if tolerance is not None and not parity["max_abs_error"] <= tolerance:
            raise ExportError(
                f"{file_name}: ONNX Runtime differs from torch by {parity['max_abs_error']:.3g} "
                f"(tolerance {tolerance:g}); the graph was not written"
            )
        codes = sum(case["codes"].numel() for case in cases)
        if tolerance is not None and not parity["zero_count_flips"] <= COUNT_FLIP_TOLERANCE * codes:
            raise ExportError(
                f"{file_name}: ONNX Runtime counts {parity['zero_count_flips']:g} zero codes otherwise than torch "
                f"over {codes} codes (tolerance {COUNT_FLIP_TOLERANCE:g} of them); the graph was not written"
            )
        atomic_write(directory / file_name, lambda target: os.replace(tmp, target))
    finally:
        Path(tmp).unlink(missing_ok=True)
    return {
        "file": file_name,
        "sha256": sha256_file(directory / file_name),
        "inputs": io_shapes(model, inputs),
        "outputs": io_shapes(model, outputs),
        "parity": parity,
    }


def _check_scales_differ(model: CSCAutoencoder, cases: list[dict[str, Any]]) -> None:
    """The two parity scales must give different codes, or the check would not test ``lmbda_scale``."""
    by_size: dict[tuple, list[torch.Tensor]] = {}
    for case in cases:
        by_size.setdefault(tuple(case["size"]), []).append(case["codes"])
    for size, codes in by_size.items():
        if (codes[0] - codes[1]).abs().max() <= 1e-5 * codes[0].abs().max():
            raise ExportError(
                f"lmbda_scale {PARITY_SCALES} give identical codes (to float rounding) at {size}: cannot verify it"
            )


def export_onnx(
    model: CSCAutoencoder,
    out_dir: str | os.PathLike,
    *,
    weights_sha256: str,
    source: str = "",
    fp16: bool = False,
    opset: int = OPSET,
    graphs: tuple[str, ...] = GRAPH_NAMES,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export ``graphs`` of ``model`` into ``out_dir`` with ``manifest.json``; returns the manifest.

    ``weights_sha256`` names the weights the graphs come from (``config.json``'s hash). With ``fp16``, a
    float16 copy of each graph is written too (``<graph>_fp16.onnx``), its error against the float32 torch
    model measured on the same inputs and recorded (not bounded: it is the cost of half precision).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).float().cpu().eval()
    model.ensure_step_sizes()
    entries: dict[str, Any] = {}
    for graph in graphs:
        if graph not in GRAPH_NAMES:
            raise ValueError(f"unknown graph {graph!r}; choose from {', '.join(GRAPH_NAMES)}")
        cases = _parity_cases(model, graph)
        if graph == "encode":
            _check_scales_differ(model, cases)
        if progress:
            progress(f"{graph}.onnx")
        entries[graph] = {"precision": "float32",
                          **_export_graph(model, graph, out, f"{graph}.onnx", opset, cases, PARITY_TOLERANCE)}
        if fp16:
            if progress:
                progress(f"{graph}_fp16.onnx")
            half = copy.deepcopy(model).half()
            entries[f"{graph}_fp16"] = {"precision": "float16",
                                        **_export_graph(half, graph, out, f"{graph}_fp16.onnx", opset, cases, None)}
    config = model.config
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": utc_now(),
        "model": {
            "weights_sha256": weights_sha256,
            "config_sha256": config_sha256(config),
            "source": source,
            "in_channels": config.in_channels,
            "code_channels": config.code_channels,
            "total_stride": config.total_stride,
            "num_steps": [s.num_steps for s in config.stages],
            "shift_average": config.shift_average,
            "shifts": len(config.shifts),
        },
        "onnx": {
            "opset": opset,
            "exporter": f"torch.onnx TorchScript tracer (torch {torch.__version__})",
            "graph_revision": GRAPH_REVISION,
            "parity_tolerance": PARITY_TOLERANCE,
            "parity_lmbda_scales": list(PARITY_SCALES),
            "graphs": entries,
        },
        "versions": library_versions(),
    }
    write_manifest(out, manifest)
    return manifest
