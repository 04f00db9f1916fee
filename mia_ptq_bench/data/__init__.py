"""Datasets behind a registry, loaded as uint8 tensors and shaped by the task spec."""

from __future__ import annotations

from pathlib import Path

from ..spec.schema import DatasetSpec
from . import loaders as _builtin  # noqa: F401  (registers the built-in datasets)
from .base import DATA_ENV, DATASET_SHAPES, DATASETS, DatasetShape, ImageDataset, Split, default_data_root, resize, \
    seeded_subset


def load_dataset(spec: DatasetSpec, data_root: Path | None = None, download: bool = False) -> ImageDataset:
    raw = DATASETS.get(spec.name)(Path(data_root) if data_root else default_data_root(), download)
    pool = resize(seeded_subset(raw.pool, spec.pool_size, spec.subset_seed), spec.image_size)
    test = resize(seeded_subset(raw.test, spec.test_size, spec.subset_seed + 1), spec.image_size)
    # Normalisation statistics stay those of the full training split.
    return ImageDataset(raw.name, pool, test, raw.num_classes, raw.mean, raw.std)


__all__ = ["DATASETS", "DATASET_SHAPES", "DATA_ENV", "DatasetShape", "ImageDataset", "Split", "default_data_root", "load_dataset"]
