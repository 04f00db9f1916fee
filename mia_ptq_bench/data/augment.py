"""Training-style augmentation on uint8 batches: random crop after zero padding, horizontal flip."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment(images: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Crop each image of a uint8 batch (B, C, H, W) at ``shifts`` (B, 2) in its padded copy, then flip where ``flips``.

    Padding is with zeros on the raw pixels, as torchvision's RandomCrop pads before normalising.
    Crop and flip are one gather from the padded batch (a flipped image reads its crop's columns
    right to left): the same pixels as cropping and then flipping, in one pass instead of an
    advanced-indexing crop, a flipped copy and a select (2.9 against 1.0 ms for a stacked CNN step's
    1,024 Fashion-MNIST images on 2 CPU cores).
    """
    if not padding and not flips.any():
        return images
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding,) * 4) if padding else images
    shifts = shifts if padding else torch.zeros_like(shifts)  # nothing to crop: the image itself
    padded_height, padded_width = height + 2 * padding, width + 2 * padding
    device = images.device
    column = torch.arange(width, device=device)
    cols = torch.where(flips.view(batch, 1), width - 1 - column, column) + shifts[:, 1:2]
    rows = torch.arange(height, device=device) + shifts[:, 0:1]
    plane = (torch.arange(batch, device=device).view(batch, 1) * channels
             + torch.arange(channels, device=device)).view(batch, channels, 1, 1)
    flat = (plane * padded_height + rows.view(batch, 1, height, 1)) * padded_width + cols.view(batch, 1, 1, width)
    return padded.reshape(-1).take(flat)


def random_augment(images: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Draw crops and flips for every image from ``generator`` (on the CPU) and apply them."""
    count = images.shape[0]
    shifts = torch.randint(0, 2 * padding + 1, (count, 2), generator=generator).to(images.device)
    flips = (torch.rand(count, generator=generator) < 0.5) & hflip
    return augment(images, shifts, flips.to(images.device), padding)
