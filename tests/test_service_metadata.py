"""``/metadata`` as any client sees it: the model, backend and versions, and no filesystem path unless the
``show_paths`` setting is on (paths inside other strings too: errors, skipped backends, provenance)."""

import json
from pathlib import Path
from types import SimpleNamespace

from csc_serve.service.metadata import HIDDEN, describe
from csc_serve.service.settings import ServeSettings

from .conftest import tiny_config


def _engine(show_paths: bool, home: Path):
    """An engine served from a model directory given as a relative path, with ONNX artifacts in the cache under
    the home directory, a skipped backend and a load error that both name files."""
    cache = home / ".cache" / "csc-serve" / "75edbc16-4f1d2c9a"
    backend = SimpleNamespace(
        artifact_dir=cache, manifest={"onnx": {"graphs": {"encode": {"sha256": "2ef39b56"}}}},
        skipped=[f"tensorrt: {cache}/plans: no GPU"],
        describe=lambda: {"backend": "onnxruntime", "device": "cpu", "artifacts": str(cache)})
    config = tiny_config(provenance={"command": "csc train --data ../data/bsd --out /srv/runs/s4 --iterations 9"})
    settings = ServeSettings(model="models/mine", backend="onnxruntime", artifacts=str(cache), show_paths=show_paths)
    return SimpleNamespace(
        backend=backend, settings=settings, config=config, stride=2, margin=22, weights_sha256="ab" * 32,
        ready=False, error=f"FileNotFoundError: [Errno 2] No such file or directory: '{cache}/decode.onnx'",
        source=SimpleNamespace(reference="models/mine", kind="directory", tag=None,
                               directory=Path("/srv/app/models/mine")))


def test_metadata_hides_every_path_by_default(tmp_path):
    hidden = describe(_engine(False, tmp_path))
    text = json.dumps(hidden)
    for path in (str(tmp_path), "/srv/", "../data", "models/mine"):
        assert path not in text, path
    assert hidden["artifacts"] == {"directory": HIDDEN, "onnx": {"encode": "2ef39b56"}}
    assert hidden["backend"]["artifacts"] == HIDDEN and hidden["settings"]["artifacts"] == HIDDEN
    assert hidden["backends_skipped"] == ["tensorrt: <hidden>/plans: no GPU"]
    assert hidden["error"] == "FileNotFoundError: [Errno 2] No such file or directory: '<hidden>/decode.onnx'"
    provenance = hidden["model"]["config"]["provenance"]["command"]
    assert provenance == "csc train --data <hidden> --out <hidden> --iterations 9"
    shown = describe(_engine(True, tmp_path))
    assert shown["artifacts"]["directory"] == str(tmp_path / ".cache" / "csc-serve" / "75edbc16-4f1d2c9a")
    assert shown["model"]["directory"] == "/srv/app/models/mine" and shown["settings"]["model"] == "models/mine"
