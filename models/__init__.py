"""The maths of CSC-CTRL: convolutional sparse coding layers, the multi-stage autoencoder, save and load, PSNR.

Image files are read by ``csc_serve.models.images`` (Pillow), imported where it is needed rather than here. The
configuration and the model files' format need no PyTorch: the names that do (the layers, the autoencoder,
FISTA, noise, PSNR) import it when first used, so a process that only reads configs (the ``bentoml serve``
supervisor, ``csc --help``) never loads it."""

from importlib import import_module
from typing import TYPE_CHECKING

from .config import ConfigError, CSCConfig, StageConfig
from .serialization import ModelLoadError, bundled_models, save_pretrained

# name -> module (in this package) that defines it, imported on first use
_LAZY = {
    "CSCAutoencoder": "autoencoder",
    "load_pretrained": "autoencoder",
    "fista_form": "fista",
    "fista_momentum": "fista",
    "CSCLayer": "layer",
    "psnr": "metrics",
    "add_gaussian_noise": "noise",
    "estimate_noise_sigma": "noise",
}

if TYPE_CHECKING:
    from .autoencoder import CSCAutoencoder, load_pretrained
    from .fista import fista_form, fista_momentum
    from .layer import CSCLayer
    from .metrics import psnr
    from .noise import add_gaussian_noise, estimate_noise_sigma


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CSCAutoencoder",
    "CSCConfig",
    "CSCLayer",
    "ConfigError",
    "ModelLoadError",
    "StageConfig",
    "add_gaussian_noise",
    "bundled_models",
    "estimate_noise_sigma",
    "fista_form",
    "fista_momentum",
    "load_pretrained",
    "psnr",
    "save_pretrained",
]
