"""csc-serve: train, export and serve convolutional sparse coding (CSC-CTRL) autoencoders.

One import package. The maths is ``csc_serve.models``, training ``csc_serve.training``, export
``csc_serve.export``; serving is ``csc_serve.backends``, ``csc_serve.service``, ``csc_serve.extract``,
``csc_serve.bench`` and ``csc_serve.cli``. The names below are the ones most programs need::

    from csc_serve import CSCAutoencoder, load_backend

    model = CSCAutoencoder.from_pretrained("csc-ctrl-rgb")
    backend = load_backend("csc-ctrl-rgb")        # torch, ONNX Runtime or TensorRT behind one contract

They are imported on first use, so ``import csc_serve`` (and ``csc --help``) stays fast.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("csc-serve")
except PackageNotFoundError:  # a source tree that is not installed (a checkout, a Bento's src/)
    __version__ = "0.0.0+source"

# An install maps models/, training/ and export/ under this package. In a source tree they sit beside it
# instead, so the folder holding them is searched as well; an install never adds anything here.
_HERE = Path(__file__).resolve().parent
if not (_HERE / "models").is_dir() and (_HERE.parent / "models" / "__init__.py").is_file():
    __path__.append(str(_HERE.parent))  # noqa: F821 (__path__ is set for every package)

_EXPORTS = {
    "CSCAutoencoder": "csc_serve.models",
    "CSCConfig": "csc_serve.models",
    "CSCLayer": "csc_serve.models",
    "ConfigError": "csc_serve.models",
    "ModelLoadError": "csc_serve.models",
    "StageConfig": "csc_serve.models",
    "add_gaussian_noise": "csc_serve.models",
    "bundled_models": "csc_serve.models",
    "estimate_noise_sigma": "csc_serve.models",
    "load_pretrained": "csc_serve.models",
    "psnr": "csc_serve.models",
    "save_pretrained": "csc_serve.models",
    "Backend": "csc_serve.backends",
    "BackendUnavailable": "csc_serve.backends",
    "available_backends": "csc_serve.backends",
    "load_backend": "csc_serve.backends",
    "resolve_model": "csc_serve.model_store",
    "Client": "csc_serve.client",
    "ExtractConfig": "csc_serve.extract",
    "load_features": "csc_serve.extract",
    "run_extract": "csc_serve.extract",
    "export_onnx": "csc_serve.export",
    "TrainConfig": "csc_serve.training",
    "train": "csc_serve.training",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'csc_serve' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
