"""Calibration data as a quantizer receives it: normalised images, and augmented copies on request."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..data import ImageDataset
from ..data.augment import random_augment
from ..data.splits import heldout_indices
from ..spec.schema import TaskSpec


@dataclass(frozen=True)
class Calibration:
    raw: torch.Tensor  # uint8 (n, C, H, W) on the target device
    normalize: Callable[[torch.Tensor], torch.Tensor]
    crop_padding: int = 0  # the task's training augmentation, for methods that calibrate on augmented rounds
    hflip: bool = False
    seed: int = 0

    @property
    def images(self) -> torch.Tensor:
        """The calibration images, normalised as the model saw its training data."""
        return self.normalize(self.raw)

    def __len__(self) -> int:
        return int(self.raw.shape[0])

    def augmented(self, round_index: int) -> torch.Tensor:
        """A seeded, augmented copy (random crop and flip, as in training); round 0 is the plain images."""
        if round_index == 0 or (self.crop_padding == 0 and not self.hflip):
            return self.images
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + round_index)
        return self.normalize(random_augment(self.raw, self.crop_padding, self.hflip, generator))

def calibration_count(keep: np.ndarray, size: int) -> int:
    """How many of its members each pool model calibrates on: ``size``, or the fewest members any pool model has.

    The same count for every model of the task, so that a model's calibration data, and with it
    its quantized weights, do not depend on which models are quantized with it in one group
    (a method may ask for more images than some models have members: OBC's 2,048).
    """
    return min(size, int(keep.sum(axis=1).min()))


def calibration_set(spec: TaskSpec, dataset: ImageDataset, keep: np.ndarray, model_index: int, size: int,
                    device: str | torch.device) -> Calibration:
    """Pool model ``model_index``'s calibration data: ``calibration_count`` of its own members, or the task's
    held-out test images."""
    cal = spec.calibration
    if cal.source == "heldout":
        raw = dataset.test.images[torch.as_tensor(heldout_indices(cal, len(dataset.test)))]
    else:
        members = np.flatnonzero(keep[model_index])
        # numpy seeds lie in [0, 2**32): the wrap changes no seed below the largest a task may give
        chosen = np.random.RandomState((cal.seed + model_index) % 2**32).choice(
            len(members), calibration_count(keep, size), replace=False)
        raw = dataset.pool.images[torch.as_tensor(np.sort(members[chosen]))]
    augment = spec.training.augment
    return Calibration(raw.to(device), dataset.normalize, augment.crop_padding, augment.hflip, cal.seed + model_index)
