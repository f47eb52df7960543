"""``csc import``: put a model directory, with its exported artifacts, into the BentoML model store."""

from __future__ import annotations

import argparse
import sys


def _import(args: argparse.Namespace) -> None:
    from csc_serve.model_store import import_model

    def progress(step: str) -> None:
        print(f"csc import: {step}...", file=sys.stderr, flush=True)

    tag = import_model(args.model_dir, name=args.name, artifacts=args.artifacts, export=args.export,
                       progress=progress)
    print(tag)
    print(f"serve it with: CSC_MODEL={tag} bentoml serve   (or: bentoml serve --arg model={tag})", file=sys.stderr)


def add_import(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "import",
        help="put a model directory and its exported artifacts into the BentoML model store",
        description="Verify a model directory (config.json, model.safetensors and their sha256), then copy it "
        "into the BentoML model store ($BENTOML_HOME/models) with its exported artifacts in artifacts/: those "
        "of --artifacts, else those in the model directory itself (a manifest.json there), else ONNX graphs "
        "exported now. Artifacts whose manifest names other weights are refused. Prints the model's tag.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="model directory (config.json + model.safetensors)")
    p.add_argument("--name", default=None, help="model-store name (default: the directory's name)")
    p.add_argument("--artifacts", default=None, help="a 'csc export' directory to store with the model")
    p.add_argument("--no-export", dest="export", action="store_false",
                   help="store no artifacts when there are none (the server then exports on first use)")
    p.set_defaults(run=_import)
