import json
import math
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import csc_serve.export.onnx_export as onnx_export
from csc_serve.export import ArtifactError, ExportError, export_onnx, verify_manifest
from csc_serve.export.flops import conv_flops
from csc_serve.export.manifest import artifact_path, read_manifest
from csc_serve.models import CSCAutoencoder, CSCLayer, StageConfig, fista_form
from csc_serve.models.fista import rescaled_form_applies
from csc_serve.models.serialization import weights_sha256

from .conftest import tiny_config

# Float32 ONNX Runtime against float32 torch: rounding through a few unrolled steps stays near 1e-6.
TOL = 1e-4


def _model(**overrides) -> CSCAutoencoder:
    torch.manual_seed(0)
    return CSCAutoencoder(tiny_config(**overrides)).eval()


def _export(model, directory, **kw):
    return export_onnx(model, directory, weights_sha256=weights_sha256(model), **kw)


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"padding_mode": "circular"},
        {"nonnegative": False, "shift_average": True},
        {"stages": (StageConfig(num_atoms=5, kernel_size=3, lmbda=0.05, num_steps=3, mu=0.1),
                    StageConfig(num_atoms=7, kernel_size=1, lmbda=0.05, num_steps=4))},
    ],
    ids=["zeros", "circular", "signed-shift-average", "ridge-and-1x1"],
)
def test_graphs_match_torch_at_new_sizes_and_per_sample_scales(overrides, tmp_path):
    model = _model(**overrides)
    manifest = _export(model, tmp_path)
    for entry in manifest["onnx"]["graphs"].values():
        assert entry["parity"]["max_abs_error"] <= TOL
        assert len(entry["parity"]["cases"]) == 4  # two sizes x two scales
    s = model.config.total_stride
    images = torch.rand(3, 3, 10 * s, 7 * s, generator=torch.Generator().manual_seed(3))
    scale = torch.tensor([0.5, 1.0, 4.0])
    with torch.no_grad():
        codes = model.encode(images, scale)
        expected = {"encode": codes, "decode": model.decode(codes), "reconstruct": model.reconstruct(images, scale)}
    feeds = {"encode": {"images": images, "lmbda_scale": scale}, "decode": {"codes": codes},
             "reconstruct": {"images": images, "lmbda_scale": scale}}
    for graph, ref in expected.items():
        out = _session(tmp_path / f"{graph}.onnx").run(None, {k: v.numpy() for k, v in feeds[graph].items()})[0]
        np.testing.assert_allclose(out, ref.numpy(), atol=TOL, rtol=0)
    # The scales really act per sample: the same image at two scales gives different codes.
    same = images[:1].repeat(2, 1, 1, 1)
    feeds = {"images": same.numpy(), "lmbda_scale": np.array([1, 3], np.float32)}
    out = _session(tmp_path / "encode.onnx").run(None, feeds)[0]
    assert not np.allclose(out[0], out[1])


@pytest.mark.parametrize("nonnegative", [True, False])
@pytest.mark.parametrize("kernel_size,stride,mu", [(5, 1, 0.0), (3, 2, 0.2), (1, 1, 0.0), (1, 1, 0.3)])
def test_inference_form_of_fista_equals_the_training_form(nonnegative, kernel_size, stride, mu):
    torch.manual_seed(1)
    layer = CSCLayer(4, 6, kernel_size, stride=stride, lmbda=0.05, num_steps=6, nonnegative=nonnegative, mu=mu).double()
    x = torch.randn(2, 4, 12, 8, dtype=torch.float64)
    thresh = layer.threshold(x, torch.tensor([1.0, 2.5], dtype=torch.float64))
    layer.ensure_step_size()
    reference = layer.fista(x, layer.dictionary, thresh, form="training")
    assert reference.abs().sum() > 0
    folded = layer.fista(x, layer.dictionary, thresh, form="folded")
    torch.testing.assert_close(folded, reference, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("nonnegative", [True, False])
@pytest.mark.parametrize("kernel_size,stride,mu", [(5, 1, 0.0), (3, 2, 0.2), (1, 1, 0.3)])
def test_rescaled_form_equals_the_training_form(nonnegative, kernel_size, stride, mu):
    torch.manual_seed(2)
    layer = CSCLayer(4, 6, kernel_size, stride=stride, lmbda=0.05, num_steps=6, nonnegative=nonnegative, mu=mu).double()
    with torch.no_grad():
        layer.lmbda_weights.copy_(torch.linspace(0.3, 2.0, 6))
    x = torch.randn(3, 4, 12, 8, dtype=torch.float64)
    scale = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    with torch.no_grad():
        reference = layer.encode(x, scale)
        with fista_form("inference"):
            assert rescaled_form_applies(x, layer.lmbda_weights)
            rescaled = layer.encode(x, scale)
            at_zero = layer.encode(x, torch.zeros(3, dtype=torch.float64))
        zero_reference = layer.encode(x, torch.zeros(3, dtype=torch.float64))
    assert (reference == 0).any() and reference.abs().sum() > 0
    torch.testing.assert_close(rescaled, reference, atol=1e-12, rtol=1e-12)  # exact up to float64 rounding
    # A requested scale of 0 runs at SCALE_FLOOR: a threshold a million times smaller than at scale 1.
    torch.testing.assert_close(at_zero, zero_reference, atol=1e-6, rtol=0)


def test_rescaled_form_falls_back_where_a_penalty_weight_is_zero():
    torch.manual_seed(3)
    layer = CSCLayer(3, 5, 3, lmbda=0.1, num_steps=5, nonnegative=False).double()
    with torch.no_grad():
        layer.lmbda_weights[2] = 0.0  # atom 2 is never thresholded: u = z / w is undefined
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        reference = layer.encode(x, 2.0)
        with fista_form("inference"):
            assert not rescaled_form_applies(x, layer.lmbda_weights)
            out = layer.encode(x, 2.0)
    torch.testing.assert_close(out, reference, atol=1e-12, rtol=1e-12)
    assert (out[:, 2] != 0).all()


def test_one_self_contained_checker_clean_file_per_graph(tmp_path):
    manifest = _export(_model(), tmp_path)
    files = ["decode.onnx", "encode.onnx", "manifest.json", "reconstruct.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    for entry in manifest["onnx"]["graphs"].values():
        proto = onnx.load(str(tmp_path / entry["file"]))
        onnx.checker.check_model(proto, full_check=True)
        assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [manifest["onnx"]["opset"]]
        assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer)
        assert [i.name for i in proto.graph.input] == [i["name"] for i in entry["inputs"]]
        assert [o.name for o in proto.graph.output] == [o["name"] for o in entry["outputs"]]


def test_manifest_names_weights_steps_shapes_and_versions(tmp_path):
    model = _model()
    _export(model, tmp_path, source="tiny")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["model"]["weights_sha256"] == weights_sha256(model)
    assert manifest["model"]["num_steps"] == [4, 3]
    assert manifest["model"]["total_stride"] == 2
    assert manifest["onnx"]["opset"] == 17
    encode = manifest["onnx"]["graphs"]["encode"]
    assert encode["inputs"] == [
        {"name": "images", "shape": ["batch", 3, "height", "width"], "dtype": "float32"},
        {"name": "lmbda_scale", "shape": ["batch"], "dtype": "float32"},
    ]
    assert encode["outputs"][0]["shape"] == ["batch", 8, "code_height", "code_width"]
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["versions"])


def test_fp16_graphs_keep_float32_io_and_record_their_error(tmp_path):
    manifest = _export(_model(), tmp_path, fp16=True)
    graphs = manifest["onnx"]["graphs"]
    for name in ("encode", "decode", "reconstruct"):
        half = graphs[f"{name}_fp16"]
        assert half["precision"] == "float16"
        # Half precision costs accuracy (more than float32 rounding) but stays small on [0, 1] images.
        assert graphs[name]["parity"]["max_abs_error"] < half["parity"]["max_abs_error"] < 0.05
        proto = onnx.load(str(tmp_path / half["file"]))
        assert {i.type.tensor_type.elem_type for i in proto.graph.input} == {onnx.TensorProto.FLOAT}
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer)


def test_a_graph_that_fails_parity_is_not_written(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "PARITY_TOLERANCE", 0.0)
    model = _model(stages=(StageConfig(num_atoms=6, kernel_size=5, lmbda=0.05, num_steps=12),))
    with pytest.raises(ExportError, match="differs from torch"):
        _export(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_model_whose_codes_ignore_lmbda_scale(tmp_path):
    model = _model(stages=(StageConfig(num_atoms=6, kernel_size=5, lmbda=0.0, num_steps=3),))
    with pytest.raises(ExportError, match="identical codes"):
        _export(model, tmp_path)


def test_manifest_of_other_weights_or_changed_files_is_refused(tmp_path):
    model = _model()
    manifest = _export(model, tmp_path)
    assert verify_manifest(tmp_path, weights_sha256(model))["model"] == manifest["model"]
    with torch.no_grad():
        model.stages[0].dictionary.mul_(-1)
    with pytest.raises(ArtifactError, match="exported from weights .* re-export"):
        verify_manifest(tmp_path, weights_sha256(model))
    entry = read_manifest(tmp_path)["onnx"]["graphs"]["decode"]
    (tmp_path / "decode.onnx").write_bytes((tmp_path / "decode.onnx").read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        artifact_path(tmp_path, entry)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(tmp_path)


def _analytic_flops(config, batch, h, w, graph):
    total = 0
    for i, stage in enumerate(config.stages):
        h, w = h // stage.stride, w // stage.stride
        one = 2 * config.stage_in_channels(i) * stage.num_atoms * stage.kernel_size**2 * h * w
        total += one * (1 + 2 * (stage.num_steps - 1)) if graph == "encode" else one
    return batch * total


@pytest.mark.parametrize("graph", ["encode", "decode"])
def test_conv_flops_counted_on_the_graph_match_the_formula(graph, tmp_path):
    model = _model()
    _export(model, tmp_path)
    shapes = {"images": (2, 3, 16, 12), "lmbda_scale": (2,), "codes": (2, 8, 8, 6)}
    expected = _analytic_flops(model.config, 2, 16, 12, graph)
    assert conv_flops(tmp_path / f"{graph}.onnx", shapes) == expected
    assert math.isclose(conv_flops(tmp_path / f"{graph}.onnx", {**shapes, "images": (4, 3, 16, 12),
                                                                "codes": (4, 8, 8, 6), "lmbda_scale": (4,)}),
                        2 * expected)


def test_csc_export_writes_graphs_and_reports_parity(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "model")
    result = subprocess.run([sys.executable, "-m", "csc_serve.cli", "export", str(tmp_path / "model"),
                             "--out", str(tmp_path / "art")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "encode.onnx: parity max abs error" in result.stdout
    assert read_manifest(tmp_path / "art")["model"]["weights_sha256"] == weights_sha256(model)


@pytest.mark.parametrize("args,message", [(["no-such-model", "--out", "x"], "no such model directory"),
                                          (["csc-ctrl-rgb"], "required")])
def test_csc_export_bad_input_gives_one_line(args, message):
    result = subprocess.run([sys.executable, "-m", "csc_serve.cli", "export", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


def test_fista_form_switches_eager_encoding_and_restores_the_default(images):
    model = _model(nonnegative=False)
    with torch.no_grad():
        default = model.encode(images)
        with fista_form("inference"):
            inference = model.encode(images)
        again = model.encode(images)
    torch.testing.assert_close(inference, default, atol=1e-5, rtol=0)  # float32, same iteration reordered
    assert torch.equal(again, default)
    with pytest.raises(ValueError, match="form must be"):
        with fista_form("fast"):
            pass
