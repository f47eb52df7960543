"""Where a model comes from: one resolver for every command, ``load_backend`` and the service.

A model reference is one of

- a model directory (``config.json`` + ``model.safetensors``),
- the name of a bundled model (``models/pretrained/<name>``, e.g. ``csc-ctrl-rgb``),
- a BentoML model-store tag, ``name:version`` or ``name:latest`` (``csc import`` prints one); a bare ``name``
  that is neither a directory nor a bundled model is the store's latest version of it.

``resolve_source`` finds the directory and checks its config (cheap); ``resolve_model`` also loads and
verifies the weights. BentoML is imported only for a tag, so an install without it still resolves
directories and bundled names, and a tag without it is a one-line error.

A model in the store is the model directory itself (``config.json``, ``model.safetensors``) with its
exported artifacts (``manifest.json`` and the graphs) in an ``artifacts/`` folder beside them; its BentoML
metadata repeats the weights' sha256 and the manifest's graph hashes. ``csc import`` writes it. Those
artifacts are what a stored model is served from unless others are given.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from csc_serve.models.serialization import (
    CONFIG_NAME,
    PRETRAINED_DIR,
    WEIGHTS_NAME,
    ModelLoadError,
    bundled_models,
    read_config,
    resolve_model_dir,
    weights_sha256,
)

if TYPE_CHECKING:
    from csc_serve.models import CSCAutoencoder

ARTIFACTS_DIR = "artifacts"
TAG_HINT = "a model-store tag is NAME:VERSION or NAME:latest; 'csc import MODEL_DIR' adds one"

__all__ = ["ARTIFACTS_DIR", "ModelSource", "ResolvedModel", "import_model", "is_store_reference",
           "resolve_model", "resolve_source", "store_reference"]


@dataclass(frozen=True)
class ModelSource:
    reference: str  # what was asked for
    kind: str  # "bundled", "directory" or "store"
    directory: Path  # holds config.json and model.safetensors
    artifacts: Path | None  # a 'csc export' directory for this model, if one came with it
    tag: str | None = None  # the resolved model-store tag

    @property
    def name(self) -> str:
        """What to call the model in reports and manifests: the resolved tag, else the reference."""
        return self.tag or self.reference


@dataclass(frozen=True, eq=False)
class ResolvedModel:
    """A loaded, verified model and where it came from (``source`` is None for an in-memory module)."""

    module: CSCAutoencoder
    weights_sha256: str
    name: str  # display name: the resolved tag, the reference as given, or "in-memory model"
    artifacts: Path | None  # exported artifacts to serve it from, if any came with it (or were given)
    source: ModelSource | None = None


def _is_bundled(reference: str) -> bool:
    return "/" not in reference and os.sep not in reference and (PRETRAINED_DIR / reference / CONFIG_NAME).is_file()


def is_store_reference(reference: str | os.PathLike) -> bool:
    """Neither an existing path nor a bundled model name, and shaped like a tag (``name:version``)."""
    text = os.fspath(reference)
    return ":" in text and not Path(text).exists() and not _is_bundled(text)


def resolve_source(reference: str | os.PathLike, artifacts: str | os.PathLike | None = None) -> ModelSource:
    """Find the model and check its config (cheap: the weights are verified when they are loaded).

    ``artifacts``, when given, overrides the artifacts a stored model carries."""
    text = os.fspath(reference)
    chosen = Path(artifacts) if artifacts else None
    stored = None
    if not is_store_reference(text):
        try:
            directory = resolve_model_dir(text)
        except ModelLoadError:
            if Path(text).exists():
                raise
            stored = _latest_stored(text)  # a bare name: its latest version in the store, as BentoML reads it
            if stored is None:
                known = ", ".join(bundled_models()) or "none"
                raise ModelLoadError(f"{text}: no such model directory, bundled model ({known}) or model-store "
                                     f"tag ({TAG_HINT})") from None
    else:
        stored = _stored_model(text)
    if stored is None:
        source = ModelSource(text, "directory" if Path(text).exists() else "bundled", directory, chosen)
    else:
        directory = Path(stored.path)
        beside = directory / ARTIFACTS_DIR
        if chosen is None and (beside / "manifest.json").is_file():
            chosen = beside
        source = ModelSource(text, "store", directory, chosen, tag=str(stored.tag))
    read_config(source.directory)
    return source


def resolve_model(model: str | os.PathLike | CSCAutoencoder | ResolvedModel,
                  artifacts: str | os.PathLike | None = None) -> ResolvedModel:
    """The loaded model (weights verified against ``config.json``), its weights' sha256, a display name and the
    artifacts to serve it from. ``model``: a reference (see ``resolve_source``), a ``CSCAutoencoder`` (no
    artifacts unless given) or an already resolved model (returned as is, or with ``artifacts`` replaced)."""
    from csc_serve.models import CSCAutoencoder, load_pretrained

    if isinstance(model, ResolvedModel):
        return model if artifacts is None else replace(model, artifacts=Path(artifacts))
    if isinstance(model, CSCAutoencoder):
        return ResolvedModel(model.eval(), weights_sha256(model), "in-memory model",
                             Path(artifacts) if artifacts else None)
    source = resolve_source(model, artifacts)
    _, document = read_config(source.directory)
    return ResolvedModel(load_pretrained(source.directory), document["weights_sha256"], source.name,
                         source.artifacts, source)


def _bentoml(what: str):
    try:
        import bentoml
    except ImportError:
        raise ModelLoadError(f"{what} needs BentoML, which is not installed here (pip install 'csc-serve[serve]')"
                             ) from None
    return bentoml


def _latest_stored(name: str):
    """The latest stored version of ``name``, or None (no such model, not a valid name, or no BentoML here)."""
    if "/" in name or os.sep in name:
        return None
    try:
        import bentoml
        from bentoml.exceptions import BentoMLException
    except ImportError:
        return None
    try:
        return bentoml.models.get(name)
    except (BentoMLException, ValueError):
        return None


def _stored_model(reference: str):
    bentoml = _bentoml(f"{reference}: a model-store tag")
    from bentoml.exceptions import BentoMLException, NotFound

    try:
        return bentoml.models.get(reference)
    except NotFound:
        raise ModelLoadError(f"{reference}: not in the BentoML model store (list it with 'bentoml models list'; "
                             "add a model with 'csc import MODEL_DIR')") from None
    except (BentoMLException, ValueError):
        known = ", ".join(bundled_models()) or "none"
        raise ModelLoadError(f"{reference}: not a model directory, a bundled model ({known}) or a valid model-store "
                             f"tag ({TAG_HINT})") from None


def store_reference(reference: str):
    """``bentoml.models.BentoModel`` for a store tag (so ``bentoml build`` packs the model), else ``None``."""
    if not is_store_reference(reference):
        return None
    return _bentoml(f"{reference}: a model-store tag").models.BentoModel(str(_stored_model(reference).tag))


def import_model(model_dir: str | os.PathLike, name: str | None = None,
                 artifacts: str | os.PathLike | None = None, export: bool = True,
                 progress: Callable[[str], None] = lambda step: None) -> str:
    """Copy a model directory and its exported artifacts into the BentoML model store; returns the tag.

    Artifacts come from ``artifacts``, else from ``model_dir`` itself when it holds a ``manifest.json``,
    else (``export``) the ONNX graphs are exported now. They must name the model's weights.
    """
    import tempfile

    from csc_serve.export.manifest import library_versions, verify_manifest

    bentoml = _bentoml("csc import (the BentoML model store)")
    source = Path(model_dir)
    if not source.is_dir():
        raise ValueError(f"{source}: not a model directory")
    name = name or _tag_name(source.resolve().name)
    bentoml.Tag.from_taglike(name)  # a bad name fails before any work
    progress("verifying the model")
    from csc_serve.models import load_pretrained

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
