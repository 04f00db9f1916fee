"""Which test images evaluate accuracy, and which are held out for calibration."""

from __future__ import annotations

import numpy as np

from ..errors import SpecError
from ..spec.schema import CalibrationSpec
from .base import ImageDataset, Split


def heldout_indices(calibration: CalibrationSpec, n_test: int) -> np.ndarray:
    """Test images set aside for calibration (source ``heldout``); none for ``members``."""
    if calibration.source != "heldout":
        return np.array([], dtype=np.int64)
    if calibration.size >= n_test:
        raise SpecError(f"calibration.size: {calibration.size} held-out images would leave no test split "
                        f"(the test split has {n_test})")
    order = np.random.RandomState(calibration.seed).permutation(n_test)
    return np.sort(order[: calibration.size])


def evaluation_test_split(calibration: CalibrationSpec, dataset: ImageDataset) -> Split:
    """The test split minus any held-out calibration images: what test accuracy is measured on."""
    keep = np.ones(len(dataset.test), dtype=bool)
    keep[heldout_indices(calibration, len(dataset.test))] = False
    return dataset.test.take(np.flatnonzero(keep))
