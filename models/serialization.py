"""A model is a directory: ``config.json`` (architecture, provenance, weights hash) and ``model.safetensors``.

Writes are atomic (temporary file, then rename). Loading checks everything before it returns a model:
readable JSON, a valid architecture, the weights' sha256, a well-formed safetensors file holding exactly
the expected tensors with the expected shapes, and finite values. Nothing is ever unpickled.

This module reads and writes architectures and tensors; it does not know the model class. The model is built
from them where the class is defined: ``CSCAutoencoder.from_pretrained`` and ``load_pretrained`` in
``csc_serve.models.autoencoder``. ``save_pretrained`` and ``weights_sha256`` take any model with a ``config``
(``CSCConfig``), ``ensure_step_sizes()`` and ``state_dict()``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from .config import ConfigError, CSCConfig

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "csc-ctrl"
FORMAT_VERSION = 1
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


class ModelLoadError(ValueError):
    """A model directory that cannot be loaded; the message names the file at fault."""


class SavableModel(Protocol):
    """What saving needs of a model (``CSCAutoencoder`` has it)."""

    config: CSCConfig

    def ensure_step_sizes(self) -> list[float]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        commit_file(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def commit_file(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make the finished temporary file ``tmp`` (beside ``path``) the file ``path``: the mode ``open()`` gives
    (mkstemp and some writers make 0600), fsync, then an atomic rename."""
    os.chmod(tmp, 0o666 & ~_umask())
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def bundled_models() -> list[str]:
    """Names of the models shipped under ``models/pretrained/``."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / CONFIG_NAME).is_file())


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A model directory from a path, or from the name of a bundled model."""
    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path}: a model is a directory holding {CONFIG_NAME} and {WEIGHTS_NAME}")
        return path
    name = str(name_or_path)
    if "/" not in name and os.sep not in name and (PRETRAINED_DIR / name / CONFIG_NAME).is_file():
        return PRETRAINED_DIR / name
    known = ", ".join(bundled_models()) or "none"
    raise ModelLoadError(f"{name}: no such model directory or bundled model (bundled: {known})")


def _weights(model: SavableModel) -> dict[str, torch.Tensor]:
    import torch

    model.ensure_step_sizes()  # the saved L must belong to the saved dictionaries
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}


def weights_sha256(model: SavableModel) -> str:
    """The sha256 ``save_pretrained`` would record for this model's weights, computed in memory."""
    from safetensors.torch import save

    return hashlib.sha256(save(_weights(model), metadata={"format": "pt"})).hexdigest()


def save_pretrained(model: SavableModel, directory: str | os.PathLike) -> str:
    """Write the model's weights, then its config (which names the weights' sha256). Returns the hash."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _weights(model)
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    digest = sha256_file(directory / WEIGHTS_NAME)
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": model.config.to_dict(),
        "weights_sha256": digest,
        "torch_version": torch.__version__,
    }
    text = json.dumps(document, indent=2, sort_keys=False) + "\n"
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return digest


def read_json_document(path: Path, fmt: str, version: int, error: type[Exception], kind: str,
                       missing: str) -> dict[str, Any]:
    """A JSON object whose ``format`` is ``fmt`` and ``format_version`` is ``version``; ``error`` (one line
    naming the file) if it is missing (``missing`` says what was expected), unreadable or of another format."""
    if not path.is_file():
        raise error(f"{path}: missing ({missing})")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err})") from None
    if not isinstance(document, dict) or document.get("format") != fmt:
        raise error(f"{path}: not a {fmt} {kind} (no \"format\": \"{fmt}\")")
    if document.get("format_version") != version:
        raise error(f"{path}: format_version {document.get('format_version')!r} is not supported "
                    f"(this version reads {version})")
    return document


def read_config(directory: str | os.PathLike) -> tuple[CSCConfig, dict[str, Any]]:
    """Parse and validate ``config.json``; returns the architecture and the whole document."""
    path = Path(directory) / CONFIG_NAME
    document = read_json_document(path, FORMAT, FORMAT_VERSION, ModelLoadError, "model config",
                                  f"a model directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    digest = document.get("weights_sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        raise ModelLoadError(f"{path}: weights_sha256 is missing or malformed")
    try:
        config = CSCConfig.from_dict(document.get("architecture"))
    except ConfigError as err:
        raise ModelLoadError(f"{path}: {err}") from None
    return config, document


def read_weights(name_or_path: str | os.PathLike, map_location: str = "cpu"
                 ) -> tuple[CSCConfig, dict[str, torch.Tensor], Path]:
    """The architecture, the tensors and the weights file of a model directory (or bundled model name):
    ``config.json`` validated, the weights' sha256 checked against it, the safetensors file read (nothing
    unpickled). Raises ``ModelLoadError`` on any fault; ``check_weights`` then checks the tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = resolve_model_dir(name_or_path)
    config, document = read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelLoadError(f"{weights}: missing")
    digest = sha256_file(weights)
    if digest != document["weights_sha256"]:
        raise ModelLoadError(
            f"{weights}: sha256 {digest[:12]}... does not match {CONFIG_NAME} "
            f"({document['weights_sha256'][:12]}...): the file is truncated, corrupted or from another model"
        )
    try:
        tensors = load_file(weights, device=str(map_location))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelLoadError(f"{weights}: not a readable safetensors file ({err})") from None
    return config, tensors, weights


def check_weights(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], weights: Path) -> None:
    """``ModelLoadError`` naming the file ``weights`` unless ``tensors`` holds exactly the names and shapes of
    ``expected`` (the state of a model built from the config), finite floats, positive step-size constants and
    non-negative penalty weights."""
    import torch

    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(f"{weights}: tensors do not match {CONFIG_NAME}: missing {missing}, "
                             f"unexpected {unexpected}")
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise ModelLoadError(
                f"{weights}: {key} has shape {tuple(value.shape)}, {CONFIG_NAME} implies {tuple(expected[key].shape)}"
            )
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise ModelLoadError(f"{weights}: {key} holds non-finite or non-float values")
    for key in (k for k in tensors if k.endswith("lipschitz")):
        if not math.isfinite(float(tensors[key])) or float(tensors[key]) <= 0:
            raise ModelLoadError(f"{weights}: {key} must be positive")
    for key in (k for k in tensors if k.endswith("lmbda_weights")):
        if (tensors[key] < 0).any():
            raise ModelLoadError(f"{weights}: {key} must be non-negative")
