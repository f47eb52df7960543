import pytest
import ray

from csc_serve.extract import ExtractConfig, load_features, run_extract

from .extract_fixtures import assert_same_features, make_images, save_tiny_model


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A Ray instance on this machine, as a one-node cluster."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CSC_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        patch.delenv("RAY_ADDRESS", raising=False)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield
        ray.shutdown()


def run(model, images, out, **settings):
    cfg = ExtractConfig(model=str(model), input=str(images), out=str(out), shard_size=3, batch_size=4,
                        progress=False, **settings)
    return run_extract(cfg)


@pytest.mark.parametrize("stage", [None, 1])
def test_ray_engine_writes_what_the_local_engine_writes(tmp_path, local_ray, stage):
    model = save_tiny_model(tmp_path / "model")
    images = tmp_path / "images"
    make_images(images, count=14)
    local = run(model, images, tmp_path / "local", stage=stage)
    on_ray = run(model, images, tmp_path / "ray", stage=stage, engine="ray", ray_actors=2)
    assert on_ray["counts"] == local["counts"] and on_ray["counts"]["errors"] == 2
    assert (tmp_path / "ray" / "errors.jsonl").read_text() == (tmp_path / "local" / "errors.jsonl").read_text()
    assert_same_features(load_features(tmp_path / "ray"), load_features(tmp_path / "local"))


def test_ray_engine_resumes_a_local_run(tmp_path, local_ray):
    model = save_tiny_model(tmp_path / "model")
    images = tmp_path / "images"
    make_images(images, count=10)
    local = run(model, images, tmp_path / "local")
    out = tmp_path / "mixed"
    run(model, images, out)
    for shard in sorted(out.glob("part-*.parquet"))[1::2]:  # as if killed: half the shards missing
        shard.unlink()
    manifest = out / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"complete": true', '"complete": false'))
    report = run(model, images, out, engine="ray", resume=True)
    assert 0 < report["images_this_run"] < local["counts"]["images"]
    assert_same_features(load_features(out), load_features(tmp_path / "local"))
