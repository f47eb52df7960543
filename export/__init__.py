"""Export of trained CSC-CTRL models: unrolled ONNX graphs, TensorRT plans, artifact manifests."""

from .manifest import MANIFEST_NAME, ArtifactError, read_manifest, verify_manifest, write_manifest
from .onnx_export import OPSET, PARITY_TOLERANCE, ExportError, export_onnx

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
