"""Datasets and the Grain input pipeline (see docs/interfaces.md)."""

from jax_mmdit.data.config import DataConfig
from jax_mmdit.data.pipeline import BatchIterator, DatasetInfo, ImageDataset, build_dataset
from jax_mmdit.data.registry import DATASETS, DatasetSpec, get_spec
from jax_mmdit.data.sources import DatasetUnavailableError

__all__ = [
    "DATASETS",
    "BatchIterator",
    "DataConfig",
    "DatasetInfo",
    "DatasetSpec",
    "DatasetUnavailableError",
    "ImageDataset",
    "build_dataset",
    "get_spec",
]
