"""One model resolver for every command: a bundled name, a model directory or a model-store tag.

A tiny model is imported into a BentoML store of its own (``BENTOML_HOME`` in a temporary directory), then
``csc export | eval | extract | bench | viz`` and ``load_backend`` run on its tag in fresh processes (BentoML
reads ``BENTOML_HOME`` when it is imported). Without BentoML, directories and names still resolve and a
tag is one clear line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from csc_serve.model_store import is_store_reference, resolve_model, resolve_source
from csc_serve.models import CSCAutoencoder

from .conftest import tiny_config
from .extract_fixtures import make_images

pytest.importorskip("bentoml")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A BentoML home of its own holding the tiny model (with its ONNX graphs), and a few tiny images."""
    root = tmp_path_factory.mktemp("store-cli")
    torch.manual_seed(0)
    CSCAutoencoder(tiny_config()).eval().save_pretrained(root / "tiny")
    make_images(root / "images", count=3, bad=False)
    env = {**os.environ, "BENTOML_HOME": str(root / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
           "CSC_CACHE_DIR": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    result = csc(env, "import", str(root / "tiny"), "--name", "tiny-store")
    assert result.returncode == 0, result.stderr
    tag = result.stdout.strip().splitlines()[-1]
    assert tag.startswith("tiny-store:")
    return root, env, tag


def csc(env, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "csc_serve.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def python(env, code, timeout=300):
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def weights_sha(root: Path) -> str:
    return json.loads((root / "tiny" / "config.json").read_text())["weights_sha256"]


def test_export_on_a_tag_records_the_tag_it_resolved_to(store):
    root, env, tag = store
    result = csc(env, "export", "tiny-store:latest", "--out", str(root / "exported"))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((root / "exported" / "manifest.json").read_text())
    assert manifest["model"]["weights_sha256"] == weights_sha(root)
    assert manifest["model"]["source"] == tag  # the version, not "latest"


def test_eval_on_a_tag(store):
    root, env, tag = store
    report = root / "eval.json"
    result = csc(env, "eval", tag, "--data", str(root / "images"), "--limit", "2", "--json", str(report))
    assert result.returncode == 0, result.stderr
    assert "reconstruct: PSNR" in result.stdout
    record = json.loads(report.read_text())
    assert record["model"] == tag and record["images"] == 2


def test_extract_on_a_tag_serves_the_artifacts_stored_with_the_model(store):
    root, env, tag = store
    out, cache = root / "features", root / "extract-cache"
    result = csc({**env, "CSC_CACHE_DIR": str(cache)}, "extract", "tiny-store:latest", str(root / "images"),
                 "--out", str(out), "--backend", "onnxruntime-cpu", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "3 of 3 images encoded" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "tiny-store:latest" and manifest["weights_sha256"] == weights_sha(root)
    # the stored artifacts/ were used: nothing was exported into the cache for this model
    assert not any(cache.glob("*/manifest.json"))


def test_bench_on_a_tag(store):
    root, env, tag = store
    out = root / "bench.json"
    result = csc(env, "bench", tag, "--backends", "torch-eager", "--batches", "1", "--sizes", "16", "--calls",
                 "encode", "--no-scaling", "--min-time", "0", "--threads", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["model"]["weights_sha256"] == weights_sha(root)
    assert {row["backend"] for row in report["results"]} == {"torch-eager"}


def test_viz_on_a_tag(store):
    root, env, tag = store
    result = csc(env, "viz", tag, "--out", str(root / "figs"), "--scale", "1")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (root / "figs").iterdir()) == ["atoms_stage1.png", "atoms_stage2.png"]


def test_load_backend_on_a_tag_serves_the_stored_artifacts(store):
    root, env, tag = store
    code = ("import numpy as np; from csc_serve import load_backend; "
            "b = load_backend('tiny-store:latest', 'onnxruntime-cpu'); "
            "print(b.describe()['artifacts']); print(b.encode(np.zeros((1, 3, 16, 16), np.float32)).shape)")
    result = python({**env, "CSC_CACHE_DIR": str(root / "load-cache")}, code)
    assert result.returncode == 0, result.stderr
    assert not (root / "load-cache").exists()  # nothing exported: the stored graphs are served
    artifacts, shape = result.stdout.strip().splitlines()[-2:]
    version = tag.split(":")[1]
    assert Path(artifacts) == root / "bentoml" / "models" / "tiny-store" / version / "artifacts"
    assert shape == "(1, 8, 8, 8)"


@pytest.mark.parametrize("command,reference,message", [
    (["viz", "--out", "x"], "no-such-model:latest", "not in the BentoML model store"),
    (["export", "--out", "x"], "no-such-model:latest", "not in the BentoML model store"),
    (["eval", "--data", "x"], "no-such-model:latest", "not in the BentoML model store"),
    (["extract", "IMAGES", "--out", "x"], "no-such-model:latest", "not in the BentoML model store"),
    (["bench", "--no-scaling"], "no-such-model:latest", "not in the BentoML model store"),
    (["viz", "--out", "x"], "bad!name:v1", "or a valid model-store tag"),
])
def test_a_bad_tag_is_one_line_and_a_non_zero_exit(store, tmp_path, command, reference, message):
    root, env, _ = store
    rest = [str(root / "images") if arg == "IMAGES" else arg for arg in command[1:]]
    result = subprocess.run([sys.executable, "-m", "csc_serve.cli", command[0], reference, *rest], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr and reference in result.stderr
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_without_bentoml_names_and_directories_resolve_and_a_tag_is_one_line(tmp_path):
    torch.manual_seed(0)
    CSCAutoencoder(tiny_config()).eval().save_pretrained(tmp_path / "m")
    blocked = "import sys; sys.modules['bentoml'] = None; "  # as if BentoML were not installed
    code = blocked + (
        "from csc_serve.model_store import resolve_source; "
        f"print(resolve_source({str(tmp_path / 'm')!r}).kind, resolve_source('csc-ctrl-rgb').kind)")
    result = python(os.environ, code)
    assert result.returncode == 0 and result.stdout.split() == ["directory", "bundled"], result.stderr
    code = blocked + "from csc_serve.cli.main import main; sys.exit(main(['viz', 'my-model:latest', '--out', 'x']))"
    result = python(os.environ, code)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == ("csc viz: error: my-model:latest: a model-store tag needs BentoML, which is "
                                     "not installed here (pip install 'csc-serve[serve]')")


def test_bentoml_is_imported_only_for_a_tag(tmp_path):
    torch.manual_seed(0)
    CSCAutoencoder(tiny_config()).eval().save_pretrained(tmp_path / "m")
    code = ("import sys; from csc_serve.model_store import resolve_model; "
            f"resolve_model({str(tmp_path / 'm')!r}); resolve_model('csc-ctrl-rgb'); "
            "print('bentoml' in sys.modules)")
    result = python(os.environ, code)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr


def test_what_counts_as_a_tag(tmp_path):
    (tmp_path / "odd:name").mkdir()
    assert is_store_reference("my-model:latest") and is_store_reference("my-model:abc123")
    assert not is_store_reference("csc-ctrl-rgb")  # a bundled name
    assert not is_store_reference(str(tmp_path / "odd:name"))  # an existing path, colon or not
    assert not is_store_reference("no-such-model")  # neither: an error naming all three kinds
    with pytest.raises(ValueError, match="no such model directory, bundled model .* or model-store tag"):
        resolve_source("no-such-model")


def test_a_resolved_model_passes_through_with_its_artifacts(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    resolved = resolve_model(tmp_path / "m")
    assert resolved.source.kind == "directory" and resolved.artifacts is None
    assert resolve_model(resolved) is resolved
    assert resolve_model(resolved, tmp_path / "a").artifacts == tmp_path / "a"
    in_memory = resolve_model(tiny_model)
    assert in_memory.weights_sha256 == resolved.weights_sha256 and in_memory.source is None


def test_ray_actors_get_the_model_the_driver_resolved(tmp_path):
    from csc_serve.extract.ray import actor_model
    from csc_serve.model_store import ModelSource

    stored = tmp_path / "bentoml" / "models" / "m" / "v1"
    store = ModelSource("m:latest", "store", stored, stored / "artifacts", tag="m:v1")
    assert actor_model(store) == (str(stored.resolve()), str((stored / "artifacts").resolve()))
    bundled = ModelSource("csc-ctrl-rgb", "bundled", Path("/anywhere/csc-ctrl-rgb"), None)
    assert actor_model(bundled) == ("csc-ctrl-rgb", None)  # by name: each node has its own install
