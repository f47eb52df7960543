"""Batch feature extraction: the sparse codes of every image of a collection, as Parquet shards.

``run`` drives a run (local threads or Ray Data, ``ray``), ``shards`` is the on-disk format and
``load_features`` reads it back.
"""

from csc_serve.extract.run import ENGINES, ExtractConfig, run_extract
from csc_serve.extract.shards import FeatureFormatError, Features, load_features

__all__ = ["ENGINES", "ExtractConfig", "FeatureFormatError", "Features", "load_features", "run_extract"]
