"""``/metadata``: what is served (model, backend, artifact hashes, versions, limits) and this worker's memory."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from typing import Any


def describe(engine) -> dict[str, Any]:
    from csc_serve.export.manifest import library_versions

    backend = engine.backend
    manifest = getattr(backend, "manifest", None) or {}
    artifacts: dict[str, Any] = {"directory": str(backend.artifact_dir) if hasattr(backend, "artifact_dir") else None}
    for section, key in (("onnx", "graphs"), ("tensorrt", "plans")):
        if section in manifest:
            artifacts[section] = {name: entry.get("sha256") for name, entry in manifest[section].get(key, {}).items()}
    source = engine.source
    return {
        "ready": engine.ready,
        "error": engine.error,
        "model": {"reference": source.reference, "kind": source.kind, "tag": source.tag,
                  "directory": str(source.directory), "weights_sha256": engine.weights_sha256,
                  "config": engine.config.to_dict(), "total_stride": engine.stride,
                  "code_channels": engine.config.code_channels, "tile_margin": engine.margin},
        "backend": backend.describe() if backend is not None else None,
        "backends_skipped": list(getattr(backend, "skipped", [])),
        "artifacts": artifacts,
        "versions": {**library_versions(), **_versions("bentoml", "pillow")},
        "settings": engine.settings.public(),
        "process": {"pid": os.getpid(), "rss_bytes": _rss()},
    }


def _versions(*names: str) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _rss() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss
