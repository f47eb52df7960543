import json
import pickle

import pytest
import torch

from csc_serve.models import CSCAutoencoder, ModelLoadError, bundled_models, load_pretrained, serialization
from tests.conftest import tiny_config


@pytest.fixture
def saved(tiny_model, tmp_path):
    directory = tmp_path / "model"
    tiny_model.save_pretrained(directory)
    return directory


def _rewrite_config(directory, change):
    path = directory / "config.json"
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize("padding_mode,nonnegative", [("zeros", True), ("circular", False)])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, images, padding_mode, nonnegative):
    torch.manual_seed(3)
    model = CSCAutoencoder(tiny_config(padding_mode=padding_mode, nonnegative=nonnegative, input_mean=(0.5,) * 3))
    scales = torch.tensor([1.0, 2.0, 0.5])
    expected = model.reconstruct(images, scales)
    digest = model.save_pretrained(tmp_path / "m")
    loaded = CSCAutoencoder.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    assert torch.equal(loaded.reconstruct(images, scales), expected)
    assert torch.equal(loaded.encode(images), model.encode(images))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["weights_sha256"] == digest
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]


def test_a_never_used_model_saves_its_real_step_sizes(tmp_path, images):
    torch.manual_seed(0)
    fresh = CSCAutoencoder(tiny_config())
    fresh.save_pretrained(tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    torch.manual_seed(0)
    used = CSCAutoencoder(tiny_config())
    assert [float(s.lipschitz) for s in loaded.stages] == used.update_step_sizes()
    assert torch.equal(loaded.encode(images), used.encode(images))


def test_the_format_layer_reads_config_and_tensors_without_the_model_class(saved, tiny_model):
    config, tensors, weights = serialization.read_weights(saved)
    assert config == tiny_model.config and weights == saved / "model.safetensors"
    expected = tiny_model.state_dict()
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    serialization.check_weights(tensors, expected, weights)
    del tensors[next(iter(expected))]
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: tensors do not match config\.json: missing"):
        serialization.check_weights(tensors, expected, weights)


def test_truncated_weights_are_refused_naming_the_file(saved):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*sha256.*truncated"):
        load_pretrained(saved)


def test_a_flipped_byte_in_the_weights_is_refused(saved):
    weights = saved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x55
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*does not match"):
        load_pretrained(saved)


def test_weights_that_are_not_safetensors_are_refused_without_unpickling(saved, tmp_path):
    marker = tmp_path / "unpickled"

    class Bomb:
        def __reduce__(self):
            return (marker.write_text, ("ran",))

    weights = saved / "model.safetensors"
    weights.write_bytes(pickle.dumps({"stages.0.dictionary": Bomb()}))
    _rewrite_config(saved, lambda d: d.update(weights_sha256=serialization.sha256_file(weights)))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: not a readable safetensors file"):
        load_pretrained(saved)
    assert not marker.exists()


def test_weights_of_another_architecture_are_refused(saved, tmp_path):
    torch.manual_seed(0)
    other = CSCAutoencoder(tiny_config(stages=({"num_atoms": 6, "kernel_size": 5}, {"num_atoms": 9, "kernel_size": 3})))
    other.save_pretrained(tmp_path / "other")
    (saved / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    _rewrite_config(saved, lambda d: d.update(weights_sha256=serialization.sha256_file(saved / "model.safetensors")))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: stages\.1\.dictionary has shape \(9, 6, 3, 3\)"):
        load_pretrained(saved)


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda p: p.write_text("{not json"), r"config\.json: not valid JSON"),
        (lambda p: p.write_bytes(b"\xff\xfe\x00"), r"config\.json: not valid JSON"),
        (lambda p: p.write_text("[]"), r"config\.json: not a csc-ctrl model config"),
        (lambda p: p.unlink(), r"config\.json: missing"),
    ],
)
def test_unreadable_configs_are_refused_naming_the_file(saved, corrupt, message):
    corrupt(saved / "config.json")
    with pytest.raises(ModelLoadError, match=message):
        load_pretrained(saved)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: d.update(format_version=99), "format_version 99"),
        (lambda d: d.pop("weights_sha256"), "weights_sha256"),
        (lambda d: d["architecture"]["stages"][0].update(kernel_size=4), "odd"),
        (lambda d: d["architecture"].update(colour=True), "unknown field"),
    ],
)
def test_invalid_config_fields_are_refused_naming_the_file(saved, change, message):
    _rewrite_config(saved, change)
    with pytest.raises(ModelLoadError, match=rf"config\.json: .*{message}"):
        load_pretrained(saved)


def test_missing_weights_and_missing_directories_are_reported(saved, tmp_path):
    (saved / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: missing"):
        load_pretrained(saved)
    with pytest.raises(ModelLoadError, match="no such model directory or bundled model"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelLoadError, match="a model is a directory"):
        load_pretrained(tmp_path / "file")


def test_non_finite_weights_are_refused(tiny_model, tmp_path):
    with torch.no_grad():
        tiny_model.stages[0].dictionary[0, 0, 0, 0] = float("nan")
    tiny_model.stages[0]._mark_synced()
    tiny_model.save_pretrained(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="non-finite"):
        load_pretrained(tmp_path / "m")


def test_negative_penalty_weights_are_refused(tiny_model, tmp_path):
    with torch.no_grad():
        tiny_model.stages[0].lmbda_weights[0] = -0.5
    tiny_model.save_pretrained(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="lmbda_weights must be non-negative"):
        load_pretrained(tmp_path / "m")


def test_a_failed_save_leaves_the_previous_model_intact(saved, monkeypatch, tiny_model, images):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        tiny_model.save_pretrained(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    load_pretrained(saved)


def test_bundled_models_are_found_by_name(tiny_model, tmp_path, monkeypatch, images):
    monkeypatch.setattr(serialization, "PRETRAINED_DIR", tmp_path / "pretrained")
    tiny_model.save_pretrained(tmp_path / "pretrained" / "tiny-rgb")
    assert bundled_models() == ["tiny-rgb"]
    loaded = CSCAutoencoder.from_pretrained("tiny-rgb")
    assert torch.equal(loaded.reconstruct(images), tiny_model.reconstruct(images))
    with pytest.raises(ModelLoadError, match=r"bundled: tiny-rgb"):
        CSCAutoencoder.from_pretrained("no-such-model")


def test_saved_files_get_the_usual_permissions(tiny_model, tmp_path):
    import os
    import stat

    tiny_model.save_pretrained(tmp_path / "m")
    mask = os.umask(0)
    os.umask(mask)
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE(os.stat(tmp_path / "m" / name).st_mode) == 0o666 & ~mask
