"""Training-style augmentation on uint8 batches: random crop after zero padding, horizontal flip."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_and_flip(padded: torch.Tensor, index: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor,
                  size: tuple[int, int], group: int | None = None) -> torch.Tensor:
    """Images ``index`` of a zero-padded uint8 batch ``padded`` (N, C, H + 2p, W + 2p), each cropped to
    ``size`` at ``shifts`` (n, 2) in [0, 2p] and flipped where ``flips`` (n,), as one gather.

    Without ``group``: (n, C, H, W), contiguous. With it: (n / group, group * C, H, W) in channels_last
    memory, image ``b * group + g`` in channel block g of row b: the input of a wide network of
    ``group`` models (pool/wide.py), with no copy. A flipped image reads its crop's columns right to
    left: the same pixels as cropping and then flipping, in one pass instead of an advanced-indexing
    crop, a flipped copy and a select (2.9 against 1.0 ms for a stacked CNN step's 1,024
    Fashion-MNIST images on 2 CPU cores).
    """
    count, (height, width) = index.shape[0], size
    channels, padded_height, padded_width = padded.shape[1:]
    models = group or 1
    batch, device = count // models, padded.device

    def per_pixel(values: torch.Tensor) -> torch.Tensor:  # a row or column per image, (n, L) -> (batch, L, models)
        return values.view(batch, models, -1).transpose(1, 2)

    column = torch.arange(width, device=device)
    cols = per_pixel(torch.where(flips.view(count, 1), width - 1 - column, column) + shifts[:, 1:2])
    rows = per_pixel(torch.arange(height, device=device) + shifts[:, 0:1])
    planes = index.view(count, 1) * channels + torch.arange(channels, device=device)
    flat = ((planes.view(batch, 1, 1, models, channels) * padded_height + rows.view(batch, height, 1, models, 1))
            * padded_width + cols.view(batch, 1, width, models, 1))  # (batch, H, W, models, C)
    if group is None:  # take() lays its output out as the index's shape, whatever the index's strides
        return padded.reshape(-1).take(flat.view(count, height, width, channels).permute(0, 3, 1, 2))
    pixels = padded.reshape(-1).take(flat)
    return pixels.view(batch, height, width, group * channels).permute(0, 3, 1, 2)


def augment(images: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Crop each image of a uint8 batch (B, C, H, W) at ``shifts`` (B, 2) in its padded copy, then flip where ``flips``.

    Padding is with zeros on the raw pixels, as torchvision's RandomCrop pads before normalising.
    """
    if not padding and not flips.any():
        return images
    shifts = shifts if padding else torch.zeros_like(shifts)  # nothing to crop: the image itself
    padded = F.pad(images, (padding,) * 4) if padding else images
    index = torch.arange(images.shape[0], device=images.device)
    return crop_and_flip(padded, index, shifts, flips, images.shape[2:])


def random_augment(images: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Draw crops and flips for every image from ``generator`` (on the CPU) and apply them."""
    count = images.shape[0]
    shifts = torch.randint(0, 2 * padding + 1, (count, 2), generator=generator).to(images.device)
    flips = (torch.rand(count, generator=generator) < 0.5) & hflip
    return augment(images, shifts, flips.to(images.device), padding)
