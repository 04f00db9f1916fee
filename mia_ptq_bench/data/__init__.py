"""Datasets behind a registry, loaded as uint8 tensors and shaped by the task spec."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

from ..errors import DataError
from ..spec.schema import DatasetSpec
from . import loaders as _builtin  # noqa: F401  (registers the built-in datasets)
from .base import DATA_ENV, DATASET_SHAPES, DATASETS, DatasetShape, ImageDataset, Split, default_data_root, \
    oversized_subset, resize, seeded_subset


def load_dataset(spec: DatasetSpec, data_root: Path | None = None, download: bool = False) -> ImageDataset:
    root = Path(data_root) if data_root else default_data_root()
    try:
        raw = DATASETS.get(spec.name)(root, download)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        # what decoding a malformed file raises: one line; a bug in a loader keeps its traceback
        raise DataError(f"{spec.name} under {root}: the files cannot be read as this dataset "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from exc
    problem = oversized_subset(spec, len(raw.pool), len(raw.test))
    if problem:
        raise DataError(problem)
    pool = resize(seeded_subset(raw.pool, spec.pool_size, spec.subset_seed), spec.image_size)
    # numpy seeds lie in [0, 2**32): the wrap changes nothing below the largest seed a task may give
    test = resize(seeded_subset(raw.test, spec.test_size, (spec.subset_seed + 1) % 2**32), spec.image_size)
    # Normalisation statistics stay those of the full training split.
    return ImageDataset(raw.name, pool, test, raw.num_classes, raw.mean, raw.std)


__all__ = ["DATASETS", "DATASET_SHAPES", "DATA_ENV", "DatasetShape", "ImageDataset", "Split", "default_data_root", "load_dataset",
           "oversized_subset"]
