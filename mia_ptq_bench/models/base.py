"""The model registry and what every stage needs to know about a network's layers."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from ..registry import Registry

ModelFactory = Callable[..., nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")

QUANTIZABLE = (nn.Conv2d, nn.Linear)

# Block types that block-wise reconstruction (BRECQ) treats as one unit. Models register theirs.
BLOCKS: Registry[type[nn.Module]] = Registry("block")


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv2d and Linear in registration order; the last one is the classifier."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, QUANTIZABLE)]
