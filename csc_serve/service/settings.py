"""Serving settings: one frozen dataclass, built from the service constructor, ``--arg`` or ``CSC_*`` env vars.

Every field has an environment variable (``CSC_`` + the field name in capitals, ``CSC_MODEL``,
``CSC_MAX_BATCH_SIZE``, ...) and a ``bentoml serve --arg name=value`` spelling; ``--arg`` wins over the
environment, and the defaults serve the bundled model on the fastest backend here. The bearer token is
read from ``CSC_SERVE_TOKEN`` only, so it never shows up in a process list.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_MODEL = "csc-ctrl-rgb"
TOKEN_ENV = "CSC_SERVE_TOKEN"
PROTECTED_FIELDS = ("token",)  # never printed, never taken from --arg
BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


@dataclass(frozen=True)
class ServeSettings:
    """How the service runs. Limits refuse a request with a 4xx before any work is done.

    Memory follows these settings, not the images sent. The serving worker holds the model's exported graphs in
    ONNX Runtime (about 200 MiB with Python and BentoML; PyTorch is loaded only for ``/atoms``, ``/explain`` or
    the torch backend), and while it works, the working set of what is in flight: each backend thread holds one
    image or tile at a time (its code maps, a few hundred bytes per pixel for the bundled model, the shifted
    copies of a shift-averaged model one after another), so the peak follows ``min(H * W, tile_size^2)`` pixels
    per thread, and ``max_batch_pixels`` bounds the pixels stacked per backend call. Images beyond
    ``tile_size^2`` pixels are cut into tiles with a margin of context (``csc_serve.service.tiling``), which costs
    that margin in extra work: a larger tile size is faster and holds more. ONNX Runtime's arena hands its
    memory back after every run, and the C heap is trimmed a second after large work ends
    (``csc_serve.service.batch_call``), so the server returns near its idle size between requests. Measured with
    ``csc bench --http`` (the process tree of ``bentoml serve``).

    ``show_paths`` (``CSC_SHOW_PATHS``, default false): whether public answers may name filesystem paths. Off,
    ``/metadata`` and error answers show ``<hidden>`` in place of the model directory, the artifact directory
    (the cache under the home directory by default), a model or artifacts setting that is a path, and any other
    path (an error naming a file, the training command in a model's provenance); turn it on for a server that
    only trusted clients reach (a local ``csc bench --http`` then times its raw baseline on the graphs served).
    """

    model: str = DEFAULT_MODEL  # bundled model name, model directory, or BentoML model-store tag
    backend: str = "auto"  # a name of csc_serve.backends.BACKEND_NAMES
    artifacts: str | None = None  # a 'csc export' directory (default: beside a store model, else the cache)
    max_batch_size: int = 32  # images (or tiles) per backend call
    max_batch_pixels: int = 1 << 20  # pixels per backend call: bounds the code maps held at once
    batch_wait_ms: float = 5.0  # how long a lone request waits for others to share its batch
    max_queue: int = 1024  # requests waiting for the model beyond this are refused (503)
    max_body_bytes: int = 64 << 20  # request bodies beyond this are refused (413)
    max_pixels: int = 1 << 22  # images beyond this many pixels are refused (413)
    max_code_values: int = 1 << 26  # code arrays (K * h * w) beyond this are refused (413)
    max_explain_values: int = 1 << 24  # /explain contributions (atoms * C * H * W) beyond this are refused (413)
    tile_size: int = 1024  # images beyond tile_size^2 pixels are processed in tiles of this size
    max_lmbda_scale: float = 100.0
    token: str | None = None  # bearer token required on every POST when set
    show_paths: bool = False  # /metadata and error answers name filesystem paths (default: <hidden>)

    def __post_init__(self) -> None:
        from csc_serve.backends import BACKEND_NAMES

        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("model must be a bundled model name, a model directory or a model-store tag")
        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {', '.join(BACKEND_NAMES)}, got {self.backend!r}")
        for name in ("max_batch_size", "max_batch_pixels", "max_queue", "max_body_bytes", "max_pixels",
                     "max_code_values", "max_explain_values", "tile_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise ValueError(f"batch_wait_ms must be between 0 and 10000, got {self.batch_wait_ms}")
        if not 0 < self.max_lmbda_scale < float("inf"):
            raise ValueError(f"max_lmbda_scale must be a positive number, got {self.max_lmbda_scale}")
        if not isinstance(self.show_paths, bool):
            raise ValueError(f"show_paths must be true or false, got {self.show_paths!r}")
        if self.token is not None and len(self.token) < 8:
            raise ValueError(f"{TOKEN_ENV} must be at least 8 characters")

    @classmethod
    def from_env(cls, arguments: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                 **overrides: Any) -> ServeSettings:
        """Settings from ``CSC_*`` variables, then ``arguments`` (``--arg``), then keyword ``overrides``."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in fields:
            if name in PROTECTED_FIELDS:
                continue
            text = env.get(f"CSC_{name.upper()}")
            if text is not None and text != "":
                values[name] = _parse(name, text, fields[name].default, f"CSC_{name.upper()}")
        for name, value in (arguments or {}).items():
            if name not in fields or name in PROTECTED_FIELDS:
                known = ", ".join(n for n in fields if n not in PROTECTED_FIELDS)
                raise ValueError(f"unknown serving argument {name!r}; known: {known}")
            values[name] = _parse(name, str(value), fields[name].default, f"--arg {name}")
        token = env.get(TOKEN_ENV)
        if token:
            values["token"] = token
        values.update(overrides)
        return cls(**values)

    def public(self) -> dict[str, Any]:
        """The settings without secrets (for /metadata and logs)."""
        out = dataclasses.asdict(self)
        out["token"] = "set" if self.token else None
        return out


def _parse(name: str, text: str, default: Any, where: str) -> Any:
    text = text.strip()
    if isinstance(default, bool):
        flag = BOOLEANS.get(text.lower())
        if flag is None:
            raise ValueError(f"{where} must be true or false (1, 0, yes, no, on, off), got {text!r}")
        return flag
    try:
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        kind = "an integer" if isinstance(default, int) else "a number"
        raise ValueError(f"{where} must be {kind}, got {text!r}") from None
    return text
