"""``manifest.json``: what an artifact directory holds and which weights it was exported from.

One manifest per artifact directory::

    {
      "format": "csc-ctrl-artifacts", "format_version": 1, "created": "2026-11-23T12:00:00+00:00",
      "model": {"weights_sha256": "...", "config_sha256": "...", "source": "csc-ctrl-rgb", "in_channels": 3,
                "code_channels": 128, "total_stride": 4, "num_steps": [7, 2], "shift_average": true,
                "shifts": 8},
      "onnx": {"opset": 17, "exporter": "...",
               "graphs": {"encode": {"file": "encode.onnx", "sha256": "...", "precision": "float32",
                                     "inputs": [{"name": "images", "shape": ["batch", 3, "height", "width"],
                                                 "dtype": "float32"}, ...],
                                     "outputs": [...], "parity": {...}},
                          "decode": {...}, "reconstruct": {...}, "encode_fp16": {...}, ...}},
      "tensorrt": {...},       # written by ``csc_serve.export.tensorrt`` when plans are built
      "versions": {"torch": "...", "onnx": "...", "onnxruntime": "...", "csc-serve": "..."}
    }

Loaders call ``verify_manifest`` with the weights hash (and the config hash) of the model they serve and refuse
anything else: the graphs depend on both, since the config sets the steps, strides and shift averaging.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from csc_serve.models.serialization import atomic_write, read_json_document, sha256_file

GRAPH_NAMES = ("encode", "decode", "reconstruct")  # every artifact directory holds these graphs
# The form of the traced graphs (models.fista: folded and rescaled FISTA; shifted copies one after the other;
# zero counts as extra outputs). Cached graphs of another revision are exported again.
GRAPH_REVISION = 3


class ExportError(RuntimeError):
    """An export that cannot be made here, or an exported graph that is invalid or does not match the torch model."""


MANIFEST_NAME = "manifest.json"
FORMAT = "csc-ctrl-artifacts"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """Exported artifacts that are missing, damaged, or belong to other weights or another machine."""


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def library_versions() -> dict[str, str]:
    """Versions of the libraries that exported or run the artifacts (those that are installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("csc-serve", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically."""
    path = Path(directory) / MANIFEST_NAME
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Parse ``manifest.json``; ``ArtifactError`` if it is missing or not a manifest of this format."""
    path = Path(directory) / MANIFEST_NAME
    manifest = read_json_document(path, FORMAT, FORMAT_VERSION, ArtifactError, "manifest",
                                  f"export the model with 'csc export MODEL --out {directory}'")
    if not isinstance(manifest.get("model"), dict) or not isinstance(manifest["model"].get("weights_sha256"), str):
        raise ArtifactError(f"{path}: no model.weights_sha256")
    return manifest


def config_sha256(config) -> str:
    """The sha256 of a model config's canonical JSON: graphs exported from one config fit no other."""
    text = json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def verify_manifest(directory: str | os.PathLike, weights_sha256: str, config=None) -> dict[str, Any]:
    """Read the manifest and refuse it unless it was exported from these weights (and this config, if given)."""
    manifest = read_manifest(directory)
    exported = manifest["model"]["weights_sha256"]
    if exported != weights_sha256:
        raise ArtifactError(
            f"{Path(directory) / MANIFEST_NAME}: exported from weights {exported[:12]}..., but the model "
            f"being served has weights {weights_sha256[:12]}...: re-export it with 'csc export'"
        )
    recorded = manifest["model"].get("config_sha256")
    if config is not None and recorded is not None and recorded != config_sha256(config):
        raise ArtifactError(
            f"{Path(directory) / MANIFEST_NAME}: exported from another config of these weights "
            f"(config {recorded[:12]}...): re-export it with 'csc export'"
        )
    return manifest


def artifact_path(directory: str | os.PathLike, entry: dict[str, Any], check_hash: bool = True) -> Path:
    """The file a manifest entry (``{"file": ..., "sha256": ...}``) names, checked against its recorded hash."""
    name = entry.get("file")
    if not isinstance(name, str) or Path(name).name != name:
        raise ArtifactError(f"{directory}: manifest entry has no plain file name: {entry!r}")
    path = Path(directory) / name
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (listed in {MANIFEST_NAME})")
    if check_hash and entry.get("sha256") != sha256_file(path):
        raise ArtifactError(f"{path}: sha256 does not match {MANIFEST_NAME}: the file was changed or truncated")
    return path
