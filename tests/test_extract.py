import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from csc_serve.backends import load_backend
from csc_serve.cli.main import main
from csc_serve.extract import ExtractConfig, load_features, run_extract
from csc_serve.extract.run import list_inputs
from csc_serve.extract.shards import FeatureFormatError
from csc_serve.models import load_pretrained
from csc_serve.training.data import load_image

from .extract_fixtures import assert_same_features, make_images, save_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Exported graphs in a private cache, shared by this module's runs and subprocesses."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CSC_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, cache_dir):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return root, make_images(root)


def extract(model_dir, source, out, **settings):
    settings = {"shard_size": 3, "batch_size": 4, "progress": False, **settings}
    return run_extract(ExtractConfig(model=str(model_dir), input=str(source), out=str(out), **settings))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir, image_dir):
    """One uninterrupted run over the image folder: what every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "out"
    report = extract(model_dir, image_dir[0], out)
    return out, report, load_features(out)


def test_features_are_the_backend_codes_of_every_readable_image(model_dir, image_dir, reference):
    root, names = image_dir
    out, report, features = reference
    assert sorted(features) == names
    backend = load_backend(str(model_dir), "auto")
    for name in names:
        image = load_image(root / name, 3)
        codes = backend.encode(image[None])[0]  # (K, h, w), one image at a time
        got = features[name]
        assert (got.height, got.width) == image.shape[1:]
        assert got.shape == codes.shape
        # batched with other images of its size: the same graph, float32 rounding apart
        np.testing.assert_allclose(got.dense(), codes, atol=1e-5)
        np.testing.assert_allclose(got.pooled, np.abs(got.dense()).mean(axis=(1, 2)), rtol=1e-6)
        assert np.all(np.diff(got.indices) > 0) and np.all(got.values != 0)


def test_manifest_records_model_stage_scale_and_counts(model_dir, image_dir, reference):
    out, report, _ = reference
    manifest = json.loads((out / "manifest.json").read_text())
    config = json.loads((model_dir / "config.json").read_text())
    assert manifest["weights_sha256"] == config["weights_sha256"]
    assert (manifest["stage"], manifest["num_stages"], manifest["lmbda_scale"]) == (2, 2, 1.0)
    assert manifest["complete"] and manifest["pooling"] == "mean_abs"
    n = len(image_dir[1])
    assert manifest["counts"] == {"images": n + 2, "encoded": n, "errors": 2, "shards": -(-(n + 2) // 3)}
    assert [s["file"] for s in manifest["shards"]] == sorted(p.name for p in out.glob("part-*.parquet"))
    assert sum(s["rows"] for s in manifest["shards"]) == n


def test_unreadable_images_are_listed_with_a_reason(reference):
    out, _, features = reference
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["path"] for e in errors) == ["broken.png", "nested/cut.png"]
    assert all("cannot read image" in e["reason"] and "\n" not in e["reason"] for e in errors)
    assert not set(features) & {"broken.png", "nested/cut.png"}


@pytest.mark.parametrize("form", ["glob", "list"])
def test_glob_and_list_inputs_give_paths_relative_to_the_input(tmp_path, model_dir, image_dir, reference, form):
    root, names = image_dir
    if form == "glob":
        source = f"{root}/**/img*.png"
        expected = names
    else:
        source = tmp_path / "list.txt"
        listed = [str(tmp_path / "images" / names[0]), "# a comment", "", *[f"images/{n}" for n in names[1:4]],
                  "images/missing.png"]
        (tmp_path / "images").symlink_to(root)
        source.write_text("\n".join(listed) + "\n")
        expected = sorted([f"images/{names[0]}", *[f"images/{n}" for n in names[1:4]]])
    out = tmp_path / "out"
    extract(model_dir, source, out)
    features = load_features(out)
    assert sorted(features) == expected
    for name in expected:  # the same image gives the same codes, whichever way it was named
        same = reference[2][name.removeprefix("images/")].dense()
        np.testing.assert_allclose(features[name].dense(), same, atol=1e-5)
    if form == "list":
        errors = (out / "errors.jsonl").read_text()
        assert "images/missing.png" in errors


def test_an_earlier_stage_gives_that_stages_codes(tmp_path, model_dir, image_dir):
    root, names = image_dir
    out = tmp_path / "out"
    report = extract(model_dir, root, out, stage=1, lmbda_scale=1.5, pooled=False)
    assert (report["stage"], report["backend"]) == (1, "torch")
    features = load_features(out)
    model = load_pretrained(model_dir)
    image = torch.from_numpy(load_image(root / names[1], 3))[None]
    with torch.inference_mode():
        codes = model.encode(image, torch.tensor([1.5]), all_stages=True)[0][0].numpy()
    assert features[names[1]].shape == codes.shape and codes.shape[0] == 6
    np.testing.assert_allclose(features[names[1]].dense(), codes, atol=1e-6)  # same torch ops, batch apart
    assert features[names[1]].pooled is None


def test_a_finished_output_is_not_overwritten_and_a_resume_must_keep_the_settings(tmp_path, model_dir, image_dir):
    out = tmp_path / "out"
    extract(model_dir, image_dir[0], out)
    with pytest.raises(FileExistsError, match="--resume"):
        extract(model_dir, image_dir[0], out)
    with pytest.raises(ValueError, match="lmbda_scale"):
        extract(model_dir, image_dir[0], out, resume=True, lmbda_scale=2.0)
    report = extract(model_dir, image_dir[0], out, resume=True)  # nothing left to do
    assert report["images_this_run"] == 0


def test_an_unfinished_output_cannot_be_loaded(tmp_path, model_dir, image_dir, reference):
    manifest = json.loads((reference[0] / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(FeatureFormatError, match="--resume"):
        load_features(tmp_path)


# ----------------------------------------------------------------------------- killed runs
def _cli(model_dir, source, out, *extra):
    return [sys.executable, "-m", "csc_serve.cli", "extract", str(model_dir), str(source), "--out", str(out),
            "--shard-size", "1", "--batch-size", "4", "--quiet", *extra]


def _kill_when(process, ready, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    make_images(root, count=24)
    return root


@pytest.fixture(scope="module")
def shard_reference(tmp_path_factory, model_dir, many_images):
    out = tmp_path_factory.mktemp("shard-reference") / "out"
    subprocess.run(_cli(model_dir, many_images, out), check=True, cwd=REPO)
    return load_features(out)


KILL_POINTS = {
    "after the manifest": lambda out: (out / "manifest.json").exists(),
    "after 3 shards": lambda out: len(list(out.glob("part-*.parquet"))) >= 3,
    "while a shard is written": lambda out: any(out.glob(".part-*.tmp")) if out.exists() else False,
    "after 15 shards": lambda out: len(list(out.glob("part-*.parquet"))) >= 15,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_killed_run_resumed_gives_every_image_once_and_identical_features(
    tmp_path, model_dir, many_images, shard_reference, point
):
    out = tmp_path / "out"
    process = subprocess.Popen(_cli(model_dir, many_images, out), cwd=REPO, stderr=subprocess.DEVNULL)
    _kill_when(process, lambda: KILL_POINTS[point](out))
    assert process.returncode == -signal.SIGKILL
    with pytest.raises(FeatureFormatError):  # not finished: nothing to load yet
        load_features(out)
    subprocess.run(_cli(model_dir, many_images, out, "--resume"), check=True, cwd=REPO)
    features = load_features(out)  # raises if an image is in two shards
    assert_same_features(features, shard_reference)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(s["rows"] for s in manifest["shards"]) == len(features)
    assert not list(out.glob(".*.tmp"))


# ----------------------------------------------------------------------------- command line
def test_help_explains_inputs_outputs_and_resume(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["extract", "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    for words in ("glob", "manifest.json", "errors.jsonl", "--resume", "--engine", "load_features", "--stage"):
        assert words in text


@pytest.mark.parametrize("args, message", [
    (["no/such/folder"], "no such folder"),
    (["{images}", "--stage", "7"], "stage 7 does not exist"),
    (["{images}", "--lmbda-scale", "-1"], "lmbda_scale must be"),
    (["{images}/*.nothing"], "matches no files"),
])
def test_bad_input_is_one_line_and_exit_1(tmp_path, capsys, model_dir, image_dir, args, message):
    args = [a.replace("{images}", str(image_dir[0])) for a in args]
    code = main(["extract", str(model_dir), *args, "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_list_inputs_sorts_and_deduplicates(tmp_path, image_dir):
    root, names = image_dir
    listing = tmp_path / "list.txt"
    listing.write_text(f"{root / names[2]}\n{root / names[0]}\n{root / names[2]}\n")
    pairs = list_inputs(listing)
    expected = sorted({str(root / names[0]), str(root / names[2])}, key=lambda p: Path(p).as_posix())
    assert [p for _, p in pairs] == expected
