"""Training-style augmentation on uint8 batches: random crop after zero padding, horizontal flip."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment(images: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Crop each image of a uint8 batch (B, C, H, W) at ``shifts`` (B, 2) in its padded copy, then flip where ``flips``.

    Padding is with zeros on the raw pixels, as torchvision's RandomCrop pads before normalising.
    """
    if padding:
        batch, _, height, width = images.shape
        padded = F.pad(images, (padding,) * 4)
        rows = (torch.arange(height, device=images.device) + shifts[:, 0:1]).view(batch, 1, height, 1)
        cols = (torch.arange(width, device=images.device) + shifts[:, 1:2]).view(batch, 1, 1, width)
        index = torch.arange(batch, device=images.device).view(batch, 1, 1, 1)
        channel = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
        images = padded[index, channel, rows, cols]
    if flips.any():
        images = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)
    return images


def random_augment(images: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Draw crops and flips for every image from ``generator`` (on the CPU) and apply them."""
    count = images.shape[0]
    shifts = torch.randint(0, 2 * padding + 1, (count, 2), generator=generator).to(images.device)
    flips = (torch.rand(count, generator=generator) < 0.5) & hflip
    return augment(images, shifts, flips.to(images.device), padding)
