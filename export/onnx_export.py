"""Unrolled FISTA to ONNX: ``encode``, ``decode`` and ``reconstruct`` graphs, each checked against torch.

Every graph is traced from the model itself (``csc_serve.export.graphs``), with dynamic batch, height and width,
written as one self-contained file, passed through ``onnx.checker``, and run in ONNX Runtime against the
torch model before it is kept: two image sizes, two ``lmbda_scale`` values that must give different codes,
max abs error at most ``PARITY_TOLERANCE``. A graph that fails is not written.

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
from csc_serve.models.serialization import atomic_write, sha256_file

from .graphs import GRAPHS, dynamic_axes, io_shapes
from .manifest import FORMAT, FORMAT_VERSION, config_sha256, library_versions, utc_now, write_manifest

OPSET = 17
# float32 rounding through 10-20 unrolled steps stays near 1e-6; 1e-4 leaves room for other CPUs' kernels.
PARITY_TOLERANCE = 1e-4
PARITY_SCALES = (1.0, 3.0)


class ExportError(RuntimeError):
    """An export that cannot be made here, or an exported graph that is invalid or does not match the torch model."""


# The form of the traced graphs (models.fista: folded and rescaled FISTA). Cached graphs of another
# revision are exported again.
GRAPH_REVISION = 2


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
    """Inputs for ``graph`` at two sizes and two scales, with the torch float32 reference outputs."""
    gen = torch.Generator().manual_seed(0)
    lo, hi = model.config.value_range
    cases = []
    for h, w in _example_sizes(model.config.total_stride):
        images = lo + (hi - lo) * torch.rand(2, model.config.in_channels, h, w, generator=gen)
        for scale in PARITY_SCALES:
            lmbda = torch.full((2,), scale)
            with torch.no_grad():
                codes = model.encode(images, lmbda)
                if graph == "encode":
                    feeds, ref = {"images": images, "lmbda_scale": lmbda}, codes
                elif graph == "decode":
                    feeds, ref = {"codes": codes}, model.decode(codes)
                else:
                    feeds, ref = {"images": images, "lmbda_scale": lmbda}, model.reconstruct(images, lmbda)
            cases.append({"size": [h, w], "lmbda_scale": scale, "feeds": feeds, "ref": ref, "codes": codes})
    return cases


def _measure_parity(path: str, cases: list[dict[str, Any]]) -> dict[str, Any]:
    session = _onnx_session(path)
    errors = []
    for case in cases:
        feeds = {k: v.numpy() for k, v in case["feeds"].items()}
        out = session.run(None, feeds)[0]
        ref = case["ref"].numpy()
        if out.shape != ref.shape:
            raise ExportError(f"{Path(path).name}: output shape {out.shape} != torch {ref.shape}")
        errors.append({"size": case["size"], "lmbda_scale": case["lmbda_scale"],
                       "max_abs_error": float(np.abs(out - ref).max())})
    return {"max_abs_error": max(e["max_abs_error"] for e in errors), "cases": errors}


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

    module_cls, inputs, outputs = GRAPHS[graph]
    module = module_cls(model).eval()
    args = tuple(cases[0]["feeds"][s["name"]] for s in inputs)
    before = set(os.listdir(directory))
    fd, tmp = tempfile.mkstemp(prefix=f".{file_name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        _trace(module, args, tmp, inputs, outputs, opset)
        _check_self_contained(directory, before | {Path(tmp).name})
        onnx.checker.check_model(tmp, full_check=True)
        parity = _measure_parity(tmp, cases)
        if tolerance is not None and not parity["max_abs_error"] <= tolerance:
            raise ExportError(
                f"{file_name}: ONNX Runtime differs from torch by {parity['max_abs_error']:.3g} "
                f"(tolerance {tolerance:g}); the graph was not written"
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
    graphs: tuple[str, ...] = ("encode", "decode", "reconstruct"),
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
        if graph not in GRAPHS:
            raise ValueError(f"unknown graph {graph!r}; choose from {sorted(GRAPHS)}")
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
