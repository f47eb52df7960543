"""The maths of CSC-CTRL: convolutional sparse coding layers, the multi-stage autoencoder, save and load."""

from .autoencoder import CSCAutoencoder
from .config import ConfigError, CSCConfig, StageConfig
from .layer import CSCLayer, fista_momentum
from .serialization import ModelLoadError, bundled_models, load_pretrained, save_pretrained

__all__ = [
    "CSCAutoencoder",
    "CSCConfig",
    "CSCLayer",
    "ConfigError",
    "ModelLoadError",
    "StageConfig",
    "bundled_models",
    "fista_momentum",
    "load_pretrained",
    "save_pretrained",
]
