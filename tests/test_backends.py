import subprocess
import sys

import numpy as np
import pytest
import torch

from csc_serve.backends import BACKEND_NAMES, available_backends, load_backend
from csc_serve.export import ArtifactError, export_onnx
from csc_serve.models import CSCAutoencoder
from csc_serve.models.serialization import weights_sha256

from .conftest import tiny_config

# Backends run the same float32 graphs; 1e-4 covers reordered float32 sums through the unrolled steps.
TOL = 1e-4
# bfloat16 keeps 8 bits of mantissa: reconstructions of [0, 1] images move by a few 1e-2 at most.
BF16_TOL = 0.1


@pytest.fixture(params=[{}, {"shift_average": True, "nonnegative": False}], ids=["plain", "shift-average"])
def model_dir(request, tmp_path):
    torch.manual_seed(0)
    model = CSCAutoencoder(tiny_config(**request.param)).eval()
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    """One plain tiny model's torch and onnxruntime backends, shared by the input-checking tests."""
    directory = tmp_path_factory.mktemp("shared")
    torch.manual_seed(0)
    model = CSCAutoencoder(tiny_config()).eval()
    export_onnx(model, directory / "art", weights_sha256=weights_sha256(model))
    return {name: load_backend(model, name, artifacts=directory / "art") for name in ("torch", "onnxruntime")}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CSC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _inputs():
    gen = np.random.default_rng(0)
    return gen.random((3, 3, 21, 30), dtype=np.float32), np.array([0.5, 1.0, 3.0], np.float32)


def test_every_available_backend_agrees_with_the_model(model_dir, cache):
    images, scale = _inputs()
    model = CSCAutoencoder.from_pretrained(model_dir)
    with torch.no_grad():
        x, s = torch.from_numpy(images), torch.from_numpy(scale)
        codes = model.encode(x, s)
        expected = {"encode": codes.numpy(), "decode": model.decode(codes).numpy(),
                    "reconstruct": model.reconstruct(x, s).numpy()}
    names = [n for n in available_backends() if n != "tensorrt"]  # tensorrt: tests/test_tensorrt.py
    assert "torch" in names and "onnxruntime-cpu" in names
    for name in names:
        # torch on the CPU here: on a CUDA device its convolutions run in TensorFloat-32 (tests/test_cuda.py)
        backend = load_backend(model_dir, name, **({"device": "cpu"} if name == "torch" else {}))
        out = {"encode": backend.encode(images, scale), "decode": backend.decode(expected["encode"]),
               "reconstruct": backend.reconstruct(images, scale)}
        for call, ref in expected.items():
            assert out[call].shape == ref.shape, (name, call)
            np.testing.assert_allclose(out[call], ref, atol=TOL, rtol=0, err_msg=f"{name} {call}")
        assert out["reconstruct"].dtype == np.float32


def test_auto_picks_onnxruntime_here_and_says_why_not_tensorrt(model_dir, cache):
    backend = load_backend(model_dir)
    assert backend.name == "onnxruntime" and backend.device == "cpu"
    assert any(reason.startswith("tensorrt:") for reason in backend.skipped)
    assert (backend.artifact_dir / "manifest.json").is_file() and backend.artifact_dir.parent == cache  # exported


def test_decode_crops_to_the_requested_size(model_dir, cache):
    backend = load_backend(model_dir, "onnxruntime")
    images, _ = _inputs()
    codes = backend.encode(images)
    assert codes.shape == (3, 8, 11, 15)
    assert backend.decode(codes).shape == (3, 3, 22, 30)
    assert backend.decode(codes, output_size=(21, 30)).shape == (3, 3, 21, 30)


def test_artifacts_of_other_weights_are_refused(model_dir, tmp_path, cache):
    torch.manual_seed(5)
    other = CSCAutoencoder(tiny_config()).eval()
    export_onnx(other, tmp_path / "other", weights_sha256=weights_sha256(other))
    with pytest.raises(ArtifactError, match="exported from weights .* re-export"):
        load_backend(model_dir, "onnxruntime", artifacts=tmp_path / "other")


def test_cached_graphs_are_reused_until_the_graph_revision_changes(model_dir, cache):
    import json

    from csc_serve.backends import cache_dir, onnx_artifacts

    model = CSCAutoencoder.from_pretrained(model_dir)
    sha = weights_sha256(model)
    directory = onnx_artifacts(model, sha, str(model_dir))
    assert directory == cache_dir(sha, model.config)
    manifest_path = directory / "manifest.json"
    written = (directory / "encode.onnx").stat().st_mtime_ns
    onnx_artifacts(model, sha, str(model_dir))
    assert (directory / "encode.onnx").stat().st_mtime_ns == written  # reused, not exported again
    old = json.loads(manifest_path.read_text())
    old["onnx"]["graph_revision"] = 1
    manifest_path.write_text(json.dumps(old))
    onnx_artifacts(model, sha, str(model_dir))
    from csc_serve.export.onnx_export import GRAPH_REVISION

    assert json.loads(manifest_path.read_text())["onnx"]["graph_revision"] == GRAPH_REVISION


def test_same_weights_under_another_config_get_their_own_graphs(tmp_path, cache):
    """The steps and the shift averaging live in the config: equal weights must not share cached graphs."""
    import json
    import shutil

    torch.manual_seed(0)
    CSCAutoencoder(tiny_config(nonnegative=False)).eval().save_pretrained(tmp_path / "plain")
    shutil.copytree(tmp_path / "plain", tmp_path / "averaged")
    config_path = tmp_path / "averaged" / "config.json"
    document = json.loads(config_path.read_text())
    document["architecture"]["shift_average"] = True
    config_path.write_text(json.dumps(document))
    images, scale = _inputs()
    first = load_backend(tmp_path / "plain", "onnxruntime")
    second = load_backend(tmp_path / "averaged", "onnxruntime")
    assert first.weights_sha256 == second.weights_sha256
    assert first.artifact_dir != second.artifact_dir
    for name, backend in (("plain", first), ("averaged", second)):
        model = CSCAutoencoder.from_pretrained(tmp_path / name)
        with torch.no_grad():
            expected = model.reconstruct(torch.from_numpy(images), lmbda_scale=torch.from_numpy(scale)).numpy()
        np.testing.assert_allclose(backend.reconstruct(images, scale), expected, atol=TOL)
    assert np.abs(first.reconstruct(images, scale) - second.reconstruct(images, scale)).max() > 1e-3
    with pytest.raises(ArtifactError, match="another config of these weights"):
        load_backend(tmp_path / "averaged", "onnxruntime", artifacts=first.artifact_dir)


def test_optimized_model_cache_is_written_then_reused(model_dir, tmp_path):
    model = CSCAutoencoder.from_pretrained(model_dir)
    export_onnx(model, tmp_path / "art", weights_sha256=weights_sha256(model))
    images, scale = _inputs()
    first = load_backend(model_dir, "onnxruntime", artifacts=tmp_path / "art")
    cached = sorted((tmp_path / "art" / "ort_cache").iterdir())
    assert [p.name.split("-")[0] for p in cached] == ["decode", "encode", "reconstruct"]
    stamps = [p.stat().st_mtime_ns for p in cached]
    second = load_backend(model_dir, "onnxruntime", artifacts=tmp_path / "art")
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    np.testing.assert_array_equal(first.encode(images, scale), second.encode(images, scale))


def test_torch_bfloat16_stays_close_to_float32(model_dir):
    images, scale = _inputs()
    exact = load_backend(model_dir, "torch", device="cpu").reconstruct(images, scale)
    bf16 = load_backend(model_dir, "torch", device="cpu", precision="bfloat16").reconstruct(images, scale)
    assert bf16.dtype == np.float32
    assert 0 < np.abs(bf16 - exact).max() < BF16_TOL


@pytest.mark.parametrize(
    "call,array,scale,message",
    [
        ("encode", np.zeros((1, 1, 8, 8), np.float32), None, "expected images of shape"),
        ("encode", np.zeros((1, 3, 0, 8), np.float32), None, "at least one pixel"),
        ("encode", np.zeros((1, 3, 8, 8), np.uint8), None, "must be floats"),
        ("encode", np.full((1, 3, 8, 8), np.nan, np.float32), None, "NaN or Inf"),
        ("encode", np.zeros((2, 3, 8, 8), np.float32), [1.0, 2.0, 3.0], "lmbda_scale must be"),
        ("reconstruct", np.zeros((1, 3, 8, 8), np.float32), -1.0, "non-negative"),
        ("decode", np.zeros((1, 5, 4, 4), np.float32), None, "expected codes of shape"),
        ("decode", np.full((1, 8, 4, 4), np.inf, np.float32), None, "NaN or Inf"),
    ],
)
@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_bad_input_is_refused_with_a_reason(name, call, array, scale, message, backends):
    backend = backends[name]
    with pytest.raises(ValueError, match=message):
        getattr(backend, call)(array) if call == "decode" else getattr(backend, call)(array, scale)


def test_unknown_backend_name_is_refused(model_dir):
    with pytest.raises(ValueError, match="unknown backend"):
        load_backend(model_dir, "openvino")
    assert "auto" in BACKEND_NAMES


def test_tensorrt_without_tensorrt_is_unavailable_not_a_crash(model_dir, cache):
    from csc_serve.backends import BackendUnavailable

    pytest.importorskip("torch")
    if "tensorrt" in available_backends():
        pytest.skip("TensorRT and a GPU are present here")
    with pytest.raises((BackendUnavailable, ArtifactError)):
        load_backend(model_dir, "tensorrt")


def test_optional_runtimes_are_imported_lazily():
    code = (
        "import sys, csc_serve.backends, csc_serve.cli, csc_serve.export; "
        "print(sorted(m for m in ('onnxruntime', 'tensorrt', 'onnx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("shift_average", [False, True], ids=["plain", "shift-average"])
def test_zero_counts_come_out_of_the_same_pass_on_every_backend(tmp_path, shift_average):
    torch.manual_seed(0)
    model = CSCAutoencoder(tiny_config(shift_average=shift_average, nonnegative=False)).eval()
    export_onnx(model, tmp_path / "art", weights_sha256=weights_sha256(model))
    gen = np.random.default_rng(1)
    images, scale = gen.random((5, 3, 19, 22), dtype=np.float32), np.array([0.5, 1, 2, 3, 1], np.float32)
    x, s = torch.from_numpy(images), torch.from_numpy(scale)
    with torch.no_grad():
        stages = model.encode(x, s, all_stages=True)
        expected_out, expected_zeros = model.reconstruct_counting(x, s)
    copies = len(model.config.shifts) if shift_average else 1
    assert expected_zeros.shape == (5, 10, 11) and float(expected_zeros.max()) <= 8 * copies
    if not shift_average:  # the zero codes of the codes themselves, position by position
        torch.testing.assert_close(expected_zeros, (stages[-1] == 0).sum(1).float())
    for name in ("torch", "onnxruntime"):
        backend = load_backend(model, name, artifacts=tmp_path / "art")
        codes, (first_stage,) = backend.encode_counting(images, scale)
        np.testing.assert_allclose(codes, stages[-1].numpy(), atol=TOL, rtol=0)
        # Counts of exact zeros: a code within float rounding of the threshold may flip between runtimes.
        assert np.abs(first_stage - (stages[0] == 0).sum(1).numpy()).sum() <= 2
        out, zeros = backend.reconstruct_counting(images, scale)
        np.testing.assert_allclose(out, expected_out.numpy(), atol=TOL, rtol=0)
        assert zeros.shape == (5, 10, 11) and np.abs(zeros - expected_zeros.numpy()).sum() <= 2 * copies
        np.testing.assert_array_equal(backend.encode(images, scale), codes)
        np.testing.assert_array_equal(backend.reconstruct(images, scale), out)
