"""``csc export``: ONNX graphs (and TensorRT plans) beside a manifest naming the weights they came from."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from csc_serve.cli.common import add_model_argument


def _export(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from csc_serve.export.manifest import GRAPH_NAMES
    from csc_serve.export.onnx_export import export_onnx
    from csc_serve.export.tensorrt import build_from_args, check_tensorrt_args
    from csc_serve.model_store import resolve_model

    check_tensorrt_args(args)  # a bad profile, or no TensorRT or GPU, fails before the export

    resolved = resolve_model(args.model)  # a model-store tag is recorded as the tag it resolved to
    model, sha, source = resolved.module, resolved.weights_sha256, resolved.name
    done: list[str] = []
    with tqdm(total=len(GRAPH_NAMES) * (2 if args.fp16 else 1), desc="export", unit="graph", leave=False) as bar:

        def progress(name: str) -> None:  # called as each graph starts
            if done:
                bar.update(1)
            done.append(name)
            bar.set_postfix_str(name)

        manifest = export_onnx(
            model, args.out, weights_sha256=sha, source=source, fp16=args.fp16, opset=args.opset, progress=progress
        )
        bar.update(1)
    out = Path(args.out)
    for entry in manifest["onnx"]["graphs"].values():
        error = entry["parity"]["max_abs_error"]
        print(f"{out / entry['file']}: parity max abs error {error:.2e} ({entry['precision']})")
    build_from_args(out, args)
    print(f"manifest: {out / 'manifest.json'} (weights {sha[:12]}..., opset {manifest['onnx']['opset']})")
    if args.json:
        print(json.dumps(manifest, indent=2))


def add_export(commands: argparse._SubParsersAction) -> None:
    from csc_serve.export.onnx_export import OPSET
    from csc_serve.export.tensorrt import add_tensorrt_arguments

    p = commands.add_parser(
        "export",
        help="export ONNX graphs (and TensorRT plans) with a fixed number of FISTA steps unrolled",
        description="Trace the model's encode, decode and reconstruct graphs to ONNX (dynamic batch, height "
        "and width; lmbda_scale a per-sample input), check each in ONNX Runtime against torch (max abs error "
        "<= 1e-4 at two sizes and two lmbda_scale values) and write them with manifest.json into --out. "
        "--tensorrt then builds TensorRT plans from them on this machine's GPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_argument(p)
    p.add_argument("--out", required=True, help="artifact directory (created if missing)")
    p.add_argument("--fp16", action="store_true", help="also write float16 graphs (*_fp16.onnx) for GPUs")
    p.add_argument("--opset", type=int, default=OPSET, help="ONNX opset")
    p.add_argument("--json", action="store_true", help="print the manifest")
    add_tensorrt_arguments(p)
    p.set_defaults(run=_export)
