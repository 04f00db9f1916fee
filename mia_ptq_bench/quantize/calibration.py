"""Calibration data as a quantizer receives it: normalised images, and augmented copies on request."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..data.augment import random_augment


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

    def take(self, count: int) -> Calibration:
        return Calibration(self.raw[:count], self.normalize, self.crop_padding, self.hflip, self.seed)
