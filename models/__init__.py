"""The maths of CSC-CTRL: convolutional sparse coding layers, the multi-stage autoencoder, save and load, PSNR.

Image files are read by ``csc_serve.models.images`` (Pillow), imported where it is needed rather than here."""

from .autoencoder import CSCAutoencoder, load_pretrained
from .config import ConfigError, CSCConfig, StageConfig
from .fista import fista_form, fista_momentum
from .layer import CSCLayer
from .metrics import psnr
from .noise import add_gaussian_noise, estimate_noise_sigma
from .serialization import ModelLoadError, bundled_models, save_pretrained

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
