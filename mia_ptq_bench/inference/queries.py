"""Fixed test-time queries: the image itself and its horizontal mirror (LiRA's augmentations)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..registry import Registry

Query = Callable[[torch.Tensor], torch.Tensor]
QUERIES: Registry[Query] = Registry("query")


@QUERIES.register("identity")
def identity(images: torch.Tensor) -> torch.Tensor:
    return images


@QUERIES.register("hflip")
def hflip(images: torch.Tensor) -> torch.Tensor:
    return images.flip(-1)
