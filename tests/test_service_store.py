"""A model in the BentoML model store: ``csc import``, served by tag behind a bearer token, ``bentoml build``,
and ``csc bench --http`` against that server. One ``bentoml serve`` for the module."""

import json
import os
import subprocess
import sys
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from csc_serve.export import export_onnx
from csc_serve.models import CSCAutoencoder
from csc_serve.models.serialization import weights_sha256
from csc_serve.service.process import ServerProcess

from .conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "store-test-token-42"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A BentoML home of its own, a tiny calibrated model, and the environment that points at them."""
    root = tmp_path_factory.mktemp("store")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is quickest
    torch.manual_seed(0)
    model = CSCAutoencoder(tiny_config(noise_calibration=((0, 1.0), (25, 2.0), (50, 4.0)))).eval()
    model.save_pretrained(root / "tiny-denoiser")
    torch.set_num_threads(threads)
    env = {**os.environ, "BENTOML_HOME": str(root / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
           "CSC_CACHE_DIR": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    return root, env


def csc(env, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "csc_serve.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tag(home):
    root, env = home
    result = csc(env, "import", str(root / "tiny-denoiser"))
    assert result.returncode == 0, result.stderr
    assert "exporting ONNX graphs" in result.stderr  # progress, step by step
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def server(home, tag):
    _, env = home
    with ServerProcess(env={**env, "CSC_MODEL": tag, "CSC_SERVE_TOKEN": TOKEN, "CSC_BATCH_WAIT_MS": "2"},
                       cwd=ROOT, timeout=240) as running:
        yield running


def test_csc_import_stores_the_model_with_its_exported_artifacts(home, tag):
    root, env = home
    name, version = tag.split(":")
    assert name == "tiny-denoiser" and version
    stored = root / "bentoml" / "models" / name / version
    sha = json.loads((root / "tiny-denoiser" / "config.json").read_text())["weights_sha256"]
    assert (stored / "model.safetensors").read_bytes() == (root / "tiny-denoiser" / "model.safetensors").read_bytes()
    manifest = json.loads((stored / "artifacts" / "manifest.json").read_text())
    assert manifest["model"]["weights_sha256"] == sha
    assert {"encode.onnx", "decode.onnx", "reconstruct.onnx"} <= {p.name for p in (stored / "artifacts").iterdir()}
    info = yaml.safe_load((stored / "model.yaml").read_text())
    assert info["metadata"]["weights_sha256"] == sha and set(info["metadata"]["artifacts"]) >= {"encode"}


def test_csc_import_refuses_bad_input_with_one_clear_line(home, tmp_path):
    root, env = home
    torch.manual_seed(1)
    other = CSCAutoencoder(tiny_config()).eval()
    export_onnx(other, tmp_path / "other-artifacts", weights_sha256=weights_sha256(other))
    for args, message in [
        (["import", str(tmp_path / "missing")], "not a model directory"),
        (["import", str(root / "tiny-denoiser"), "--artifacts", str(tmp_path / "other-artifacts")],
         "exported from weights"),
        (["import", str(tmp_path)], "config.json: missing"),
        (["import", str(root / "tiny-denoiser"), "--name", "!!!"], "not a valid BentoML tag"),
    ]:
        result = csc(env, *args)
        assert result.returncode == 1, result.stdout
        last = result.stderr.strip().splitlines()[-1]
        assert message in last and "Traceback" not in result.stderr, result.stderr


def test_the_store_model_is_served_by_tag_behind_the_token(home, server, tag, tmp_path):
    (tmp_path / "in.png").write_bytes(_png())
    files = {"image": ("in.png", _png())}
    assert httpx.post(server.url + "/reconstruct", files=files, timeout=30).status_code == 401
    wrong = httpx.post(server.url + "/reconstruct", files=files, headers={"Authorization": "Bearer nope-nope"})
    assert wrong.status_code == 401 and wrong.json()["error"].startswith("missing or wrong bearer token")
    assert server.status("/readyz") == 200 and server.status("/metrics") == 200  # probes stay open
    with bentoml.SyncHTTPClient(server.url, token=TOKEN, timeout=60) as client:
        meta = client.metadata()
        denoised = client.denoise(image=tmp_path / "in.png", sigma=25.0)
    assert meta["model"]["kind"] == "store" and meta["model"]["tag"] == tag
    assert meta["backend"]["backend"] == "onnxruntime"
    # served from the graphs stored with the model (paths are hidden from /metadata): nothing exported anew
    root, _ = home
    name, version = tag.split(":")
    stored = json.loads((root / "bentoml" / "models" / name / version / "artifacts" / "manifest.json").read_text())
    assert meta["artifacts"]["onnx"] == {graph: entry["sha256"] for graph, entry in stored["onnx"]["graphs"].items()}
    assert not any((root / "cache").glob("*/manifest.json"))
    assert Image.open(denoised).size == (30, 20)


def test_bentoml_build_references_the_service_the_code_and_the_store_model(home, tag):
    _, env = home
    result = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag"], cwd=ROOT,
                            env={**env, "CSC_MODEL": tag}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    bento_tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = bento_tag.split(":")
    bento = Path(env["BENTOML_HOME"]) / "bentos" / name / version
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert info["service"] == "csc_serve.service.api:CSCService"
    # The service references the store model; BentoML copies it in when the Bento is exported or containerized.
    assert [m["tag"] for m in info["services"][0]["models"]] == [tag]
    assert (bento / "src" / "models" / "pretrained" / "csc-ctrl-rgb" / "model.safetensors").is_file()
    assert {r["name"] for r in info["schema"]["routes"]} >= {"encode", "decode", "reconstruct", "denoise", "metadata"}


def test_csc_bench_http_reports_every_endpoint_against_the_raw_backend_and_the_memory(home, server, tmp_path):
    _, env = home
    out = tmp_path / "http.json"
    result = csc({**env, "CSC_SERVE_TOKEN": TOKEN}, "bench", "--http", server.url, "--clients", "4", "--duration",
                 "2", "--warmup", "1", "--sizes", "32", "--rounds", "2", "--large", "96", "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["memory_source"] == "worker (/metadata)" and report["idle_bytes"] > 0
    large = report["large"]
    assert large["status"] == 200 and large["size"] == 96 and large["seconds"] > 0 and large["direct_seconds"] > 0
    assert large["ratio_to_direct"] == pytest.approx(large["seconds"] / large["direct_seconds"])
    assert "backend;dur=" in large["server_timing"] and large["sigma"] > 0 and large["peak_bytes"] > 0
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for rnd in report["rounds"]:
        assert list(rnd["endpoints"]) == ["encode", "reconstruct", "denoise"] and rnd["end_bytes"] > 0
        for endpoint, e in rnd["endpoints"].items():
            assert e["errors"] == 0 and e["requests"] > 0 and e["throughput_rps"] > 0, endpoint
            assert 0 < e["latency_ms"]["p50"] <= e["latency_ms"]["p99"]
            raw = e["raw_backend"]
            assert raw["backend"] == "onnxruntime-cpu" and len(raw["images_per_s_runs"]) == 2  # before and after
            assert raw["call"] == ("encode_counting" if endpoint == "encode" else "reconstruct_counting")
            assert e["ratio_to_raw"] == pytest.approx(e["throughput_rps"] / raw["images_per_s"])
    growth = report["targets"]["round_growth"]
    ends = [r["end_bytes"] for r in report["rounds"]]
    assert growth == pytest.approx((ends[1] - ends[0]) / ends[0])
    assert "/encode" in result.stdout and "p99" in result.stdout and "blind /denoise" in result.stdout


def _png() -> bytes:
    import io

    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()
