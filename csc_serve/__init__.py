"""csc-serve: train, export and serve convolutional sparse coding (CSC-CTRL) autoencoders."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("csc-serve")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
