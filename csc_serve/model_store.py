"""Where a served model comes from: a bundled name, a model directory, or the BentoML model store.

A model in the store is the model directory itself (``config.json``, ``model.safetensors``) with its
exported artifacts (``manifest.json`` and the graphs) in an ``artifacts/`` folder beside them; its BentoML
metadata repeats the weights' sha256 and the manifest's graph hashes. ``csc import`` writes it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from csc_serve.models.serialization import CONFIG_NAME, PRETRAINED_DIR, WEIGHTS_NAME, bundled_models, read_config

ARTIFACTS_DIR = "artifacts"


@dataclass(frozen=True)
class ModelSource:
    reference: str  # what was asked for
    kind: str  # "bundled", "directory" or "store"
    directory: Path  # holds config.json and model.safetensors
    artifacts: Path | None  # a 'csc export' directory for this model, if one came with it
    tag: str | None = None  # the resolved model-store tag


def is_store_reference(reference: str) -> bool:
    """Neither an existing path nor a bundled model name: a BentoML model-store tag (``name[:version]``)."""
    return not Path(reference).exists() and not (
        "/" not in reference and (PRETRAINED_DIR / reference / CONFIG_NAME).is_file()
    )


def resolve_source(reference: str, artifacts: str | os.PathLike | None = None) -> ModelSource:
    """Find the model and check its config (cheap: the weights are verified when they are loaded)."""
    if not is_store_reference(reference):
        from csc_serve.models.serialization import resolve_model_dir

        directory = resolve_model_dir(reference)
        kind = "directory" if Path(reference).exists() else "bundled"
        source = ModelSource(reference, kind, directory, Path(artifacts) if artifacts else None)
    else:
        stored = _stored_model(reference)
        directory = Path(stored.path)
        beside = directory / ARTIFACTS_DIR
        chosen = Path(artifacts) if artifacts else (beside if (beside / "manifest.json").is_file() else None)
        source = ModelSource(reference, "store", directory, chosen, tag=str(stored.tag))
    read_config(source.directory)
    return source


def _bentoml():
    try:
        import bentoml
    except ImportError:
        raise ValueError('the BentoML model store needs BentoML: pip install -e ".[serve]"') from None
    return bentoml


def _stored_model(reference: str):
    bentoml = _bentoml()
    from bentoml.exceptions import BentoMLException

    try:
        return bentoml.models.get(reference)
    except (BentoMLException, ValueError):
        known = ", ".join(bundled_models()) or "none"
        raise ValueError(
            f"{reference}: no such model directory, bundled model ({known}) or BentoML model-store tag "
            "(list the store with 'bentoml models list'; add a model with 'csc import MODEL_DIR')"
        ) from None


def store_reference(reference: str):
    """``bentoml.models.BentoModel`` for a store tag (so ``bentoml build`` packs the model), else ``None``."""
    if not is_store_reference(reference):
        return None
    return _bentoml().models.BentoModel(str(_stored_model(reference).tag))


def import_model(model_dir: str | os.PathLike, name: str | None = None,
                 artifacts: str | os.PathLike | None = None, export: bool = True,
                 progress: Callable[[str], None] = lambda step: None) -> str:
    """Copy a model directory and its exported artifacts into the BentoML model store; returns the tag.

    Artifacts come from ``artifacts``, else from ``model_dir`` itself when it holds a ``manifest.json``,
    else (``export``) the ONNX graphs are exported now. They must name the model's weights.
    """
    import tempfile

    from csc_serve.export.manifest import library_versions, verify_manifest
    from csc_serve.models import load_pretrained

    bentoml = _bentoml()
    source = Path(model_dir)
    if not source.is_dir():
        raise ValueError(f"{source}: not a model directory")
    name = name or _tag_name(source.resolve().name)
    bentoml.Tag.from_taglike(name)  # a bad name fails before any work
    progress("verifying the model")
    model = load_pretrained(source)  # refuses a damaged or mismatched directory
    sha = read_config(source)[1]["weights_sha256"]
    if artifacts is None and (source / "manifest.json").is_file():
        artifacts = source
    with tempfile.TemporaryDirectory(prefix="csc-import-") as scratch:
        manifest = None
        if artifacts is not None:
            manifest = verify_manifest(artifacts, sha, model.config)
        elif export:
            from csc_serve.export.onnx_export import export_onnx

            progress("exporting ONNX graphs")
            artifacts = Path(scratch) / ARTIFACTS_DIR
            manifest = export_onnx(model, artifacts, weights_sha256=sha, source=str(source))
        metadata = {"weights_sha256": sha, "source": str(source.resolve()), "versions": library_versions()}
        if manifest is not None:
            metadata["artifacts"] = {k: v.get("sha256") for k, v in manifest.get("onnx", {}).get("graphs", {}).items()}
        progress("writing to the model store")
        with bentoml.models.create(name, labels={"format": "csc-ctrl"}, metadata=metadata) as stored:
            target = Path(stored.path)
            for file in (CONFIG_NAME, WEIGHTS_NAME):
                shutil.copy2(source / file, target / file)
            if manifest is not None:
                _copy_artifacts(Path(artifacts), target / ARTIFACTS_DIR, manifest)
            return str(stored.tag)


def _copy_artifacts(source: Path, target: Path, manifest: dict) -> None:
    """The manifest and every file it lists (ONNX graphs, TensorRT plans), nothing else."""
    from csc_serve.export.manifest import MANIFEST_NAME, artifact_path

    target.mkdir(parents=True, exist_ok=True)
    entries = list(manifest.get("onnx", {}).get("graphs", {}).values())
    entries += list(manifest.get("tensorrt", {}).get("plans", {}).values())
    for entry in entries:
        if isinstance(entry, dict) and "file" in entry:
            shutil.copy2(artifact_path(source, entry), target / entry["file"])
    shutil.copy2(source / MANIFEST_NAME, target / MANIFEST_NAME)


def _tag_name(text: str) -> str:
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in text.lower()).strip("-_.")
    if not name:
        raise ValueError(f"cannot make a model-store name from {text!r}; pass --name")
    return name
