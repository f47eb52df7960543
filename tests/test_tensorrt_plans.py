"""TensorRT plans are served only when their manifest matches: the weights, the ONNX graphs, the TensorRT
version, the GPU architecture and the precision asked for; each refusal says why."""

import os
from pathlib import Path

import pytest

from csc_serve.backends.tensorrt_backend import verify_plans
from csc_serve.export.manifest import ArtifactError, read_manifest, write_manifest
from csc_serve.export.tensorrt import Profile, TensorRTMismatch
from csc_serve.models.serialization import sha256_file

SHA = "a" * 64


def fake_artifacts(directory: Path, precisions=("float32",)) -> Path:
    """A manifest with ONNX and plan files of random bytes, built by TensorRT 10.3.0 for an 8.9 GPU."""
    graphs, plans = {}, {}
    for graph in ("encode", "decode", "reconstruct"):
        for name in (graph + ("_fp16" if p == "float16" else "") for p in precisions):
            for ext in ("onnx", "plan"):
                (directory / f"{name}.{ext}").write_bytes(os.urandom(64))
            onnx_sha = sha256_file(directory / f"{name}.onnx")
            graphs[name] = {"file": f"{name}.onnx", "sha256": onnx_sha}
            plans[name] = {"file": f"{name}.plan", "sha256": sha256_file(directory / f"{name}.plan"),
                           "profile": Profile().to_dict(), "onnx": f"{name}.onnx", "onnx_sha256": onnx_sha}
    tensorrt = {"version": "10.3.0", "device": "NVIDIA L4", "compute_capability": "8.9", "plans": plans}
    write_manifest(directory, {"format": "csc-ctrl-artifacts", "format_version": 1, "onnx": {"graphs": graphs},
                               "model": {"weights_sha256": SHA, "total_stride": 2}, "tensorrt": tensorrt})
    return directory


def test_matching_plans_are_accepted(tmp_path):
    _, plans = verify_plans(fake_artifacts(tmp_path), SHA, "10.3.0", "8.9")
    assert {graph: path.name for graph, (path, _) in plans.items()} == {
        "encode": "encode.plan", "decode": "decode.plan", "reconstruct": "reconstruct.plan"}


def edit_manifest(directory: Path, edit) -> None:
    manifest = read_manifest(directory)
    edit(manifest)
    write_manifest(directory, manifest)


ACCEPTED = (SHA, "10.3.0", "8.9")


@pytest.mark.parametrize(
    "tamper,args,error,message",
    [
        pytest.param(None, (SHA, "10.7.0", "8.9"), TensorRTMismatch,
                     r"built with TensorRT 10\.3\.0, but this is TensorRT 10\.7\.0", id="other-tensorrt"),
        pytest.param(None, (SHA, "10.3.0", "9.0", "float32", "NVIDIA H100"), TensorRTMismatch,
                     r"compute capability 8\.9 \(NVIDIA L4\), but this GPU \(NVIDIA H100\) has compute capability 9\.0",
                     id="other-gpu-architecture"),
        pytest.param(None, ("b" * 64, "10.3.0", "8.9"), ArtifactError, "exported from weights aaaaaaaaaaaa",
                     id="other-weights"),
        pytest.param(lambda d: (d / "decode.plan").write_bytes(b"tampered"), ACCEPTED, ArtifactError,
                     "decode.plan: sha256 does not match", id="changed-plan"),
        pytest.param(lambda d: edit_manifest(d, lambda m: m["onnx"]["graphs"]["encode"].update(sha256="c" * 64)),
                     ACCEPTED, ArtifactError, "encode.plan was built from another encode graph", id="other-onnx"),
        pytest.param(None, (*ACCEPTED, "float16"), ArtifactError, "csc export --fp16 --tensorrt", id="no-fp16-plans"),
        pytest.param(lambda d: edit_manifest(d, lambda m: m.pop("tensorrt")), ACCEPTED, ArtifactError,
                     "lists no TensorRT plans: build them with 'csc export MODEL --out DIR --tensorrt'", id="no-plans"),
    ],
)
def test_plans_are_refused_saying_why(tmp_path, tamper, args, error, message):
    fake_artifacts(tmp_path)
    if tamper:
        tamper(tmp_path)
    with pytest.raises(error, match=message):
        verify_plans(tmp_path, *args)
