"""``/metadata``: what is served (model, backend, artifact hashes, versions, limits) and this worker's memory.

Filesystem paths stay out of it unless the ``show_paths`` setting is on: the model directory, the artifact
directory (by default the cache under the home directory), a model or artifacts setting that is a path, and
any path inside another string (an error, a skipped backend's reason, the training command in the model's
provenance) read ``<hidden>``. ``hide_paths`` does the same to error answers (``csc_serve.service.guard``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

HIDDEN = "<hidden>"
# A path that does not continue a word: two separators at least ("/srv/models", "/home/u/.cache/x") or a home,
# dot or drive start ("~/x", "../data", "C:\\models"). A route ("poll /readyz"), a URL, "image/png", "1/2" and
# "2.13.0+cpu" are left alone, and so is the rest of a path whose start was hidden ("<hidden>/encode.onnx").
_CHAR = r"""[^\s'"`,;()\[\]{}<>|]"""
PATH = re.compile(rf"(?<![\w.~/\\>:-])(?:(?:~|\.{{1,2}}|[A-Za-z]:)[/\\]{_CHAR}+|[/\\]{_CHAR}*[/\\]{_CHAR}*)")


def describe(engine) -> dict[str, Any]:
    from csc_serve.export.manifest import library_versions

    backend = engine.backend
    manifest = getattr(backend, "manifest", None) or {}
    artifacts: dict[str, Any] = {"directory": str(backend.artifact_dir) if hasattr(backend, "artifact_dir") else None}
    for section, key in (("onnx", "graphs"), ("tensorrt", "plans")):
        if section in manifest:
            artifacts[section] = {name: entry.get("sha256") for name, entry in manifest[section].get(key, {}).items()}
    source = engine.source
    info = {
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
    if engine.settings.show_paths:
        return info
    # A model directory given as a relative path ("models/mine") is a path without a leading slash.
    named = [engine.settings.artifacts] + ([source.reference, engine.settings.model] if source.kind == "directory"
                                           else [])
    return hide_paths(info, named)


def hide_paths(value: Any, paths: Iterable[str | os.PathLike | None] = ()) -> Any:
    """``value`` (a string, or lists and dicts of them) with every path in it replaced by ``<hidden>``:
    the given ``paths`` wherever they occur (relative ones too; a bare name is no path and stays), then
    anything that looks like a path (``PATH``)."""
    known = sorted({text for text in map(os.fspath, filter(None, paths)) if "/" in text or "\\" in text},
                   key=len, reverse=True)
    return _hide(value, known)


def _hide(value: Any, known: list[str]) -> Any:
    if isinstance(value, str):
        for path in known:
            value = value.replace(path, HIDDEN)
        return PATH.sub(HIDDEN, value)
    if isinstance(value, dict):
        return {key: _hide(item, known) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_hide(item, known) for item in value]
    return value


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
