"""TensorRT: the parser check on exported graphs, profiles, the build driven
through a stand-in ``tensorrt`` module, and (with TensorRT on a CUDA GPU) real plans compared with torch."""

import argparse
import importlib.util
import inspect
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import MagicMock

import numpy as np
import onnx
import pytest
import torch

from csc_serve.backends.base import BackendUnavailable
from csc_serve.backends.tensorrt_backend import TensorRTBackend, check_in_profile, verify_plans
from csc_serve.export.manifest import ArtifactError, read_manifest, write_manifest
from csc_serve.export.tensorrt import (
    INSTALL_HINT,
    Profile,
    TensorRTBuildError,
    TensorRTUnavailable,
    add_tensorrt_arguments,
    build_from_args,
    build_plans,
    check_tensorrt_args,
    input_shapes,
    parse_profile,
)
from csc_serve.export.trt_ops import check_tensorrt_compatible, unsupported_ops
from csc_serve.models import CSCAutoencoder, CSCConfig, StageConfig
from csc_serve.models.serialization import sha256_file, weights_sha256
from tests.conftest import tiny_config
from tests.test_tensorrt_plans import SHA, fake_artifacts

HAVE_GPU = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason="needs TensorRT and a CUDA GPU")
without_gpu = pytest.mark.skipif(HAVE_GPU, reason="TensorRT and a CUDA GPU are present")

# What the exporter emits: stride 1 and 2 stages with zero or circular boundaries, and shift averaging,
# whose reconstruct graph replicates borders with an edge-mode Pad.
CONFIGS = {
    "zeros": tiny_config(),
    "circular": tiny_config(padding_mode="circular"),
    "shift-average": CSCConfig(
        in_channels=1, stages=(StageConfig(num_atoms=4, kernel_size=3, stride=2, num_steps=2),), shift_average=True
    ),
}
IMAGE_AXES = ["batch", "channels", "height", "width"]
AXES = {"images": IMAGE_AXES, "reconstruction": IMAGE_AXES, "lmbda_scale": ["batch"],
        "codes": ["batch", "codes", "code_height", "code_width"]}


class Traced(torch.nn.Module):
    """One graph's signature: a method of the model, with the model a submodule so its weights are initializers."""

    def __init__(self, model: CSCAutoencoder, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *args):
        return getattr(self.model, self.method)(*args)


def trace_graphs(model: CSCAutoencoder, directory: Path) -> dict:
    """The bare tracer and a minimal manifest, for a tree without ``export.onnx_export``."""
    calls = {"encode": (["images", "lmbda_scale"], "codes"), "decode": (["codes"], "images"),
             "reconstruct": (["images", "lmbda_scale"], "reconstruction")}
    size = 8 * model.config.total_stride
    sizes = {"channels": model.config.in_channels, "codes": model.config.code_channels}
    feeds = {"images": torch.rand(2, model.config.in_channels, size, size), "lmbda_scale": torch.ones(2)}
    feeds["codes"] = model.encode(feeds["images"], feeds["lmbda_scale"]).detach()
    graphs = {}
    for name, (inputs, output) in calls.items():
        dynamic = {k: {i: a for i, a in enumerate(AXES[k]) if a not in sizes} for k in inputs + [output]}
        torch.onnx.export(Traced(model, name), tuple(feeds[k] for k in inputs), str(directory / f"{name}.onnx"),
                          dynamo=False, opset_version=17, input_names=inputs, output_names=[output],
                          dynamic_axes=dynamic)
        specs = [{"name": k, "shape": [sizes.get(a, a) for a in AXES[k]], "dtype": "float32"} for k in inputs]
        graphs[name] = {"file": f"{name}.onnx", "sha256": sha256_file(directory / f"{name}.onnx"),
                        "precision": "float32", "inputs": specs}
    manifest = {"format": "csc-ctrl-artifacts", "format_version": 1, "onnx": {"opset": 17, "graphs": graphs},
                "model": {"weights_sha256": weights_sha256(model), "total_stride": model.config.total_stride}}
    write_manifest(directory, manifest)
    return manifest


def export_graphs(model: CSCAutoencoder, directory: Path, fp16: bool = False) -> dict:
    """The graphs and manifest from ``export_onnx`` (given only the options it takes), else ``trace_graphs``."""
    try:
        from csc_serve.export.onnx_export import export_onnx
    except ImportError:
        return trace_graphs(model, directory)
    options = {"weights_sha256": weights_sha256(model), "source": "test", "fp16": fp16}
    accepted = inspect.signature(export_onnx).parameters
    return export_onnx(model, directory, **{k: v for k, v in options.items() if k in accepted})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(name)``: (model, directory, manifest) of ``CONFIGS[name]``, exported once per module."""
    done = {}

    def get(name: str):
        if name not in done:
            torch.manual_seed(0)
            model, directory = CSCAutoencoder(CONFIGS[name]).eval(), tmp_path_factory.mktemp(name)
            done[name] = model, directory, export_graphs(model, directory, fp16=name == "zeros")
        return done[name]

    return get


# ----------------------------------------------------------------------------- exported graphs
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_exported_graphs_pass_the_tensorrt_check(exported, name):
    _, directory, manifest = exported(name)
    assert manifest["onnx"]["graphs"]
    for graph, entry in manifest["onnx"]["graphs"].items():
        assert check_tensorrt_compatible(directory / entry["file"]) == [], graph
        assert unsupported_ops(directory / entry["file"]) == [], graph


def test_circular_boundary_is_traced_as_slices_not_a_wrap_pad(exported):
    _, directory, manifest = exported("circular")
    for entry in manifest["onnx"]["graphs"].values():
        # No Pad, so no 'wrap' mode, which ONNX has from opset 19 only (the check refuses it at 17, above).
        assert "Pad" not in {node.op_type for node in onnx.load(directory / entry["file"]).graph.node}


def test_shift_average_replicates_borders_with_an_edge_pad(exported):
    _, directory, manifest = exported("shift-average")
    graph = onnx.load(directory / manifest["onnx"]["graphs"]["reconstruct"]["file"]).graph
    assert {a.s for n in graph.node if n.op_type == "Pad" for a in n.attribute if a.name == "mode"} == {b"edge"}


# ----------------------------------------------------------------------------- profiles
@pytest.mark.parametrize(
    "batch,size,expected",
    [
        ("1,8,32", "64x64,256x256,1024x1024", Profile((1, 8, 32), (64, 256, 1024), (64, 256, 1024))),
        ("4", "128", Profile((4, 4, 4), (128, 128, 128), (128, 128, 128))),
        (" 1, 2,4 ", "32x64, 64X128 ,128x256", Profile((1, 2, 4), (32, 64, 128), (64, 128, 256))),
    ],
)
def test_profiles_parse(batch, size, expected):
    assert parse_profile(batch, size) == expected
    assert Profile.from_dict(expected.to_dict()) == expected


@pytest.mark.parametrize(
    "batch,size,stride,message",
    [
        ("1,8", "64", None, "--trt-batch '1,8': give MIN,OPT,MAX"),
        ("1,,4", "64", None, "--trt-batch '1,,4': give MIN,OPT,MAX"),
        ("0,1,2", "64", None, "--trt-batch: '0' is not a positive whole number"),
        ("a,b,c", "64", None, "--trt-batch: 'a' is not a positive whole number"),
        ("8,1,32", "64", None, "--trt-batch 8,1,32 --trt-size 64: batch needs min <= opt <= max, got 8,1,32"),
        ("1", "64x64,32x32,128x128", None, "height needs min <= opt <= max, got 64,32,128"),
        ("1", "32x64,32x16,32x128", None, "width needs min <= opt <= max, got 64,16,128"),
        ("1", "64x64x3", None, "--trt-size: '64x64x3' is not HEIGHTxWIDTH"),
        ("1", "64x", None, "--trt-size: '64x' is not HEIGHTxWIDTH"),
        ("1", "64*64", None, "--trt-size: '64*64' is not a positive whole number"),
        ("1", "30x32,62x64,94x96", 4, "30x32, 62x64, 94x96 are not multiples of the model's total stride 4"),
    ],
)
def test_bad_profiles_are_refused_naming_the_flag(batch, size, stride, message):
    with pytest.raises(ValueError) as err:
        parse_profile(batch, size, stride)
    assert message in str(err.value)


def test_profile_sizes_that_are_multiples_of_the_stride_are_accepted():
    assert parse_profile("1", "30x32,62x64,94x96", stride=2).height == (30, 62, 94)


@pytest.mark.parametrize("fields", [{"batch": (1, 2)}, {"batch": (1, 2.5, 3)}, {"height": (True, 2, 3)}])
def test_profile_rejects_malformed_triples(fields):
    with pytest.raises(ValueError):
        Profile(**fields)
    with pytest.raises(ArtifactError, match="malformed TensorRT profile"):
        Profile.from_dict({**Profile().to_dict(), **fields})


IMAGE_SHAPES = {"images": ((1, 3, 32, 48), (4, 3, 64, 64), (8, 3, 128, 96)), "lmbda_scale": ((1,), (4,), (8,))}


@pytest.mark.parametrize(
    "graph,expected",
    [
        ("encode", IMAGE_SHAPES),
        ("decode", {"codes": ((1, 8, 16, 24), (4, 8, 32, 32), (8, 8, 64, 48))}),  # the image sizes over stride 2
        ("reconstruct", IMAGE_SHAPES),
    ],
)
def test_profile_gives_every_graph_input_its_shapes(exported, graph, expected):
    model, _, manifest = exported("zeros")
    assert (model.config.total_stride, model.config.code_channels) == (2, 8)
    profile = Profile((1, 4, 8), (32, 64, 128), (48, 64, 96))
    assert input_shapes(profile, manifest["onnx"]["graphs"][graph]["inputs"], 2) == expected


def test_input_shapes_refuse_unknown_axes_and_misaligned_sizes():
    with pytest.raises(ArtifactError, match="no profile for the axis 'depth'"):
        input_shapes(Profile(), [{"name": "x", "shape": ["batch", "depth"]}], 1)
    with pytest.raises(ValueError, match="total stride 3"):
        input_shapes(Profile(), [{"name": "x", "shape": ["batch"]}], 3)


def test_inputs_outside_the_profile_are_refused_naming_it():
    profile = Profile((1, 2, 4), (32, 64, 128), (32, 64, 128))
    check_in_profile("encode", "images", (4, 3, 128, 128), (1, 3, 32, 32), (4, 3, 128, 128), profile)
    with pytest.raises(ValueError, match=r"outside the TensorRT profile .*\(batch 1\.\.4 \(opt 2\), size 32x32\.\."):
        check_in_profile("encode", "images", (8, 3, 64, 64), (1, 3, 32, 32), (4, 3, 128, 128), profile)


# ----------------------------------------------------------------------------- manifests
# ----------------------------------------------------------------------------- building, with a stand-in TensorRT
def stand_in_tensorrt(parses: bool = True) -> MagicMock:
    """A mock ``tensorrt`` for ``build_plans``: the parser reads the ONNX inputs, a plan is their names, and the
    timing cache grows by one byte per build."""
    trt = MagicMock(__version__="10.3.0")
    trt.BuilderFlag, trt.NetworkDefinitionCreationFlag = SimpleNamespace(TF32="TF32"), SimpleNamespace(STRONGLY_TYPED=1)
    builder, parser = trt.Builder.return_value, trt.OnnxParser.return_value
    network, config = builder.create_network.return_value, builder.create_builder_config.return_value

    def parse(path):
        names = [i.name for i in onnx.load(path).graph.input]
        network.num_inputs, network.get_input.side_effect = len(names), lambda i: SimpleNamespace(name=names[i])
        return parses

    parser.parse_from_file.side_effect = parse
    parser.num_errors, parser.get_error.return_value = 1, "In node 3 (importPad): UNSUPPORTED_NODE"
    builder.build_serialized_network.side_effect = lambda net, _: ",".join(
        net.get_input(i).name for i in range(net.num_inputs)).encode()
    config.create_timing_cache.side_effect = lambda data: SimpleNamespace(serialize=lambda: bytes(data) + b"+")
    config.set_timing_cache.side_effect = lambda cache, ignore_mismatch: setattr(config, "cache", cache) or True
    config.get_timing_cache.side_effect = lambda: config.cache
    return trt


@pytest.fixture
def artifacts(exported, tmp_path, monkeypatch):
    """A copy of the zeros model's export, with this machine posing as an 8.9 GPU."""
    monkeypatch.setattr("csc_serve.export.tensorrt.cuda_device",
                        lambda: {"device": "NVIDIA L4", "compute_capability": "8.9"})
    model, directory, manifest = exported("zeros")
    return model, shutil.copytree(directory, tmp_path / "artifacts"), manifest


def test_build_records_plans_profiles_and_timing_cache(artifacts, monkeypatch):
    model, directory, manifest = artifacts
    trt = stand_in_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    profile = Profile((1, 2, 4), (16, 32, 64), (16, 48, 64))
    section = build_plans(directory, profile, "float32", workspace_mib=64)
    builder, config = trt.Builder.return_value, trt.Builder.return_value.create_builder_config.return_value
    shapes = {c.args[0]: c.args[1:] for c in builder.create_optimization_profile.return_value.set_shape.call_args_list}
    assert shapes == {"images": ((1, 3, 16, 16), (2, 3, 32, 48), (4, 3, 64, 64)),
                      "lmbda_scale": ((1,), (2,), (4,)), "codes": ((1, 8, 8, 8), (2, 8, 16, 24), (4, 8, 32, 32))}
    assert {c.args for c in builder.create_network.call_args_list} == {(2,)}  # strongly typed
    config.clear_flag.assert_called_with("TF32")
    config.set_memory_pool_limit.assert_called_with(trt.MemoryPoolType.WORKSPACE, 64 << 20)
    assert (directory / "decode.plan").read_bytes() == b"codes"
    assert (directory / "trt_timing.cache").read_bytes() == b"+++"  # carried from plan to plan and saved
    build_plans(directory, profile, "float16")  # the other precision keeps these plans and reuses the cache
    assert (directory / "trt_timing.cache").read_bytes() == b"++++++"
    recorded = read_manifest(directory)["tensorrt"]
    assert (recorded["version"], recorded["compute_capability"], recorded["device"]) == ("10.3.0", "8.9", "NVIDIA L4")
    assert sorted(recorded["plans"]) == sorted(manifest["onnx"]["graphs"])
    assert recorded["plans"]["encode"] == section["plans"]["encode"]
    assert recorded["plans"]["encode"]["sha256"] == sha256_file(directory / "encode.plan")
    assert recorded["plans"]["encode"]["onnx_sha256"] == manifest["onnx"]["graphs"]["encode"]["sha256"]
    assert recorded["plans"]["encode_fp16"]["profile"] == profile.to_dict()
    verify_plans(directory, manifest["model"]["weights_sha256"], "10.3.0", "8.9", precision="float16")


def test_parser_errors_are_reported_and_nothing_is_written(artifacts, monkeypatch):
    _, directory, _ = artifacts
    monkeypatch.setitem(sys.modules, "tensorrt", stand_in_tensorrt(parses=False))
    with pytest.raises(TensorRTBuildError, match=r"encode\.onnx: the TensorRT ONNX parser refused it:\n  In node 3"):
        build_plans(directory)
    assert "tensorrt" not in read_manifest(directory) and not list(directory.glob("*.plan"))


# ----------------------------------------------------------------------------- without TensorRT or a GPU
@without_gpu
def test_backend_and_build_without_tensorrt_or_gpu_say_how_to_install(tmp_path):
    with pytest.raises(BackendUnavailable, match=re.escape(INSTALL_HINT)):
        TensorRTBackend(tiny_config(), SHA, fake_artifacts(tmp_path))
    with pytest.raises(TensorRTUnavailable, match=re.escape(INSTALL_HINT)):
        build_plans(tmp_path)
    with pytest.raises(TensorRTUnavailable, match=re.escape(INSTALL_HINT)):
        check_tensorrt_args(argparse.Namespace(tensorrt=True, trt_batch="1", trt_size="64"))


@without_gpu
def test_csc_export_tensorrt_without_tensorrt_or_gpu_is_one_line(tmp_path):
    import subprocess

    args = ["export", "csc-ctrl-rgb", "--out", str(tmp_path / "a"), "--tensorrt"]
    result = subprocess.run([sys.executable, "-m", "csc_serve.cli", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and INSTALL_HINT in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "a").exists()  # refused before anything is exported


def test_command_line_options(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--fp16", action="store_true")
    add_tensorrt_arguments(parser)
    args = parser.parse_args([])
    assert parse_profile(args.trt_batch, args.trt_size) == Profile()
    assert build_from_args(tmp_path, args) is None  # nothing asked, nothing built
    with pytest.raises(SystemExit):
        parser.parse_args(["--trt-workspace-mib", "0"])
    check_tensorrt_args(args)  # nothing asked, nothing checked
    bad = parser.parse_args(["--tensorrt", "--trt-batch", "2,1,4"])
    with pytest.raises(ValueError, match="--trt-batch 2,1,4"):
        check_tensorrt_args(bad)
    with pytest.raises(ValueError, match="--trt-batch 2,1,4"):
        build_from_args(fake_artifacts(tmp_path), bad)


# ----------------------------------------------------------------------------- on a GPU with TensorRT
@needs_gpu
@pytest.mark.parametrize(
    "name,precision",
    [("zeros", "float32"), ("zeros", "float16"), ("circular", "float32"), ("shift-average", "float32")],
)
def test_plans_match_torch(exported, name, precision):
    model, directory, manifest = exported(name)
    suffix = "_fp16" if precision == "float16" else ""
    if "reconstruct" + suffix not in manifest["onnx"]["graphs"]:
        pytest.skip(f"no {precision} graphs exported")
    stride = model.config.total_stride
    section = build_plans(directory, parse_profile("1,2,4", f"{8 * stride},32,64", stride), precision)
    assert (directory / section["timing_cache"]).is_file()
    backend = TensorRTBackend(model.config, manifest["model"]["weights_sha256"], directory, precision=precision)
    images = torch.rand(3, model.config.in_channels, 32, 48, generator=torch.Generator().manual_seed(1))
    # float32 plans run with TF32 off and agree with torch as ONNX Runtime does; float16 plans to the error the
    # float16 ONNX graph showed at export, with room for other kernels' rounding.
    parity = manifest["onnx"]["graphs"]["reconstruct" + suffix].get("parity", {}).get("max_abs_error", 0.0)
    tolerance = 1e-4 if precision == "float32" else max(2e-2, 3 * parity)
    for scale in (1.0, 3.0):
        with torch.no_grad():
            codes = model.encode(images, scale)
            expected = [codes, model.decode(codes), model.reconstruct(images, scale)]
        got = [backend.encode(images.numpy(), scale), backend.decode(codes.numpy()),
               backend.reconstruct(images.numpy(), scale)]
        for graph, out, ref in zip(("encode", "decode", "reconstruct"), got, expected):
            np.testing.assert_allclose(out, ref.numpy(), atol=tolerance, err_msg=f"{name} {graph} at {scale}")
    with pytest.raises(ValueError, match="outside the TensorRT profile"):
        backend.encode(np.zeros((8, model.config.in_channels, 32, 32), np.float32))
