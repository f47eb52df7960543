"""Runtime backends behind one contract: ``encode``, ``decode``, ``reconstruct`` on numpy arrays.

``load_backend(model, name="auto")`` returns one. ``auto`` takes the fastest that works here: TensorRT (plans
built for this GPU), then ONNX Runtime CUDA, then ONNX Runtime CPU, then torch. ONNX Runtime and TensorRT
are imported only when asked for, so a CPU-only install without them still serves through torch.

``model`` is anything ``csc_serve.model_store.resolve_model`` takes: a bundled name, a model directory, a
BentoML model-store tag (``name:version``, ``name:latest``), a ``CSCAutoencoder``, or a ``ModelSource``.
ONNX Runtime and TensorRT backends of a model given by reference read its config and run its graphs: the
PyTorch model is loaded (and PyTorch imported) only to export graphs that are missing, or for the torch
backend. ONNX graphs come from
``artifacts`` (a ``csc export`` directory), else from those a stored model carries, else from a cache
directory keyed by the hashes of the weights and the config (``$CSC_CACHE_DIR``, default
``~/.cache/csc-serve``), exported there on first use. Either way the manifest must name the weights (and
the config) being served.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from csc_serve.backends.base import Backend, BackendUnavailable
from csc_serve.model_store import ModelSource, ResolvedModel, resolve_source
from csc_serve.models import CSCConfig

if TYPE_CHECKING:
    from csc_serve.models import CSCAutoencoder

BACKEND_NAMES = ("auto", "tensorrt", "onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda", "torch")

__all__ = ["BACKEND_NAMES", "Backend", "BackendUnavailable", "available_backends", "load_backend"]


def cache_dir(sha256: str, config) -> Path:
    """The cache directory of one model's graphs: weights and config both shape the graphs."""
    from csc_serve.export.manifest import config_sha256

    root = Path(os.environ.get("CSC_CACHE_DIR") or Path.home() / ".cache" / "csc-serve")
    return root / f"{sha256[:16]}-{config_sha256(config)[:8]}"


@dataclass
class _Model:
    """What a backend is built from: the config, the weights' hash, a display name, the artifacts, and the
    PyTorch model, loaded on first use (``module()``)."""

    config: CSCConfig
    sha256: str
    name: str
    artifacts: Path | None
    load: Callable[[], CSCAutoencoder]
    _module: CSCAutoencoder | None = None

    def module(self) -> CSCAutoencoder:
        if self._module is None:
            self._module = self.load()
        return self._module


def _model(model) -> _Model:
    from csc_serve.models.serialization import read_config

    if isinstance(model, (str, os.PathLike)):
        model = resolve_source(model)
    if isinstance(model, ModelSource):
        config, document = read_config(model.directory)

        def load(directory=model.directory):
            from csc_serve.models import load_pretrained

            return load_pretrained(directory)

        return _Model(config, document["weights_sha256"], model.name, model.artifacts, load)
    from csc_serve.model_store import resolve_model

    resolved = resolve_model(model)
    return _Model(resolved.module.config, resolved.weights_sha256, resolved.name, resolved.artifacts,
                  lambda: resolved.module, resolved.module)


def onnx_artifacts(model: CSCAutoencoder | _Model, sha256: str, source: str, artifacts=None,
                   fp16: bool = False) -> Path:
    """A directory holding the model's ONNX graphs: ``artifacts`` as given, or the cache (exported if needed)."""
    from csc_serve.export.manifest import ArtifactError, config_sha256, read_manifest

    if artifacts is not None:
        return Path(artifacts)
    directory = cache_dir(sha256, model.config)
    try:
        manifest = read_manifest(directory)
    except ArtifactError:
        manifest = None
    from csc_serve.export.manifest import GRAPH_REVISION

    current = manifest is not None and manifest.get("onnx", {}).get("graph_revision") == GRAPH_REVISION
    same_model = current and manifest["model"]["weights_sha256"] == sha256
    if same_model and manifest["model"].get("config_sha256") == config_sha256(model.config):
        if not fp16 or "encode_fp16" in manifest.get("onnx", {}).get("graphs", {}):
            return directory
    from csc_serve.export.onnx_export import export_onnx

    module = model.module() if isinstance(model, _Model) else model
    export_onnx(module, directory, weights_sha256=sha256, source=source, fp16=fp16)
    return directory


def _onnxruntime(model, sha, source, provider, artifacts, precision, threads):
    from csc_serve.backends.onnxruntime_backend import OnnxRuntimeBackend, available_providers

    if provider not in available_providers():
        raise BackendUnavailable(f"onnxruntime with the {provider} provider is not available here")
    directory = onnx_artifacts(model, sha, source, artifacts, fp16=precision == "float16")
    return OnnxRuntimeBackend(model.config, sha, directory, provider=provider, precision=precision, threads=threads)


def _tensorrt(model, sha, source, artifacts, precision):
    from csc_serve.backends.tensorrt_backend import TensorRTBackend

    directory = Path(artifacts) if artifacts is not None else cache_dir(sha, model.config)
    return TensorRTBackend(model.config, sha, directory, precision=precision)


def load_backend(
    model: str | os.PathLike | CSCAutoencoder | ResolvedModel | ModelSource,
    name: str = "auto",
    *,
    artifacts: str | os.PathLike | None = None,
    device: str | None = None,
    precision: str = "float32",
    threads: int | None = None,
    compile: bool = False,
) -> Backend:
    """A backend serving ``model`` (bundled name, model directory, model-store tag, ``CSCAutoencoder``, or a
    ``resolve_model`` result); ``artifacts`` defaults to those a stored model carries.

    ``name``: one of ``BACKEND_NAMES``. ``precision``: ``float32``, or ``float16`` (ONNX Runtime, TensorRT:
    the ``--fp16`` graphs) or ``bfloat16``/``float16`` (torch). ``device`` applies to torch (``cpu``,
    ``cuda``); ``compile`` wraps torch calls in ``torch.compile``. ``threads``: ONNX Runtime CPU threads.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKEND_NAMES)}")
    module = _model(model)  # the PyTorch model itself is loaded only where needed
    sha, source = module.sha256, module.name
    if artifacts is None:
        artifacts = module.artifacts
    if name == "torch":
        import torch

        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return _torch_backend(module.module(), dev, precision, compile, sha)
    if name == "tensorrt":
        return _tensorrt(module, sha, source, artifacts, precision)
    if name in ("onnxruntime-cpu", "onnxruntime-cuda"):
        return _onnxruntime(module, sha, source, name.split("-")[1], artifacts, precision, threads)
    if name == "onnxruntime":
        from csc_serve.backends.onnxruntime_backend import available_providers

        provider = "cuda" if "cuda" in available_providers() else "cpu"
        return _onnxruntime(module, sha, source, provider, artifacts, precision, threads)
    return _auto(module, sha, source, artifacts, precision, threads)


def _torch_backend(module, device, precision, compile, sha):
    from csc_serve.backends.torch_backend import TorchBackend

    return TorchBackend(module, device=device, precision=precision, compile=compile, sha256=sha)


def _auto(module, sha, source, artifacts, precision, threads) -> Backend:
    from csc_serve.export.manifest import ArtifactError

    reasons = []
    attempts = [
        ("tensorrt", lambda: _tensorrt(module, sha, source, artifacts, precision)),
        ("onnxruntime-cuda", lambda: _onnxruntime(module, sha, source, "cuda", artifacts, precision, threads)),
        ("onnxruntime-cpu", lambda: _onnxruntime(module, sha, source, "cpu", artifacts, precision, threads)),
    ]
    for label, attempt in attempts:
        try:
            backend = attempt()
        except (BackendUnavailable, ArtifactError, ImportError) as err:
            reasons.append(f"{label}: {err}")
            continue
        backend.skipped = reasons
        return backend
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = _torch_backend(module.module(), device, "float32" if precision == "float16" else precision, False, sha)
    backend.skipped = reasons
    return backend


def available_backends() -> list[str]:
    """Backend names whose runtime is importable here (artifacts may still be needed)."""
    import importlib.util

    import torch

    names = []
    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        names.append("tensorrt")
    from csc_serve.backends.onnxruntime_backend import available_providers

    names += [f"onnxruntime-{p}" for p in reversed(available_providers())]
    return names + ["torch"]
