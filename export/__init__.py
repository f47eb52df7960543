"""Export of trained CSC-CTRL models: unrolled ONNX graphs, TensorRT plans, artifact manifests.

Reading and checking manifests needs no PyTorch; exporting does, and imports it when first used."""

from importlib import import_module
from typing import TYPE_CHECKING

from .manifest import MANIFEST_NAME, ArtifactError, ExportError, read_manifest, verify_manifest, write_manifest

_LAZY = {"OPSET": "onnx_export", "PARITY_TOLERANCE": "onnx_export", "export_onnx": "onnx_export"}

if TYPE_CHECKING:
    from .onnx_export import OPSET, PARITY_TOLERANCE, export_onnx


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MANIFEST_NAME",
    "OPSET",
    "PARITY_TOLERANCE",
    "ArtifactError",
    "ExportError",
    "export_onnx",
    "read_manifest",
    "verify_manifest",
    "write_manifest",
]
