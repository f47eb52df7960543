"""The maths of CSC-CTRL: convolutional sparse coding layers, the multi-stage autoencoder, save and load."""

from .autoencoder import CSCAutoencoder
from .config import ConfigError, CSCConfig, StageConfig
from .fista import fista_form, fista_momentum
from .layer import CSCLayer
from .noise import add_gaussian_noise, estimate_noise_sigma
from .serialization import ModelLoadError, bundled_models, load_pretrained, save_pretrained

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
    "save_pretrained",
]
