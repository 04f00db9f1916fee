"""The model registry and what every stage needs to know about a network's layers."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from ..errors import SpecError
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


# Model options are free-form in the task file: each factory checks the ones it reads, with these bounds.
MAX_LAYERS = 64
MAX_UNITS = 65_536  # hidden units or channels of one layer (before the width multiplier)


def layer_sizes(option: str, value: object, max_layers: int = MAX_LAYERS) -> list[int]:
    """``value`` as a list of layer sizes (ints from 1 to MAX_UNITS), or a SpecError naming ``model.options.<option>``."""
    if not isinstance(value, list) or not 1 <= len(value) <= max_layers:
        raise SpecError(f"model.options.{option}: expected a list of 1 to {max_layers} layer sizes, got {value!r:.80}")
    return [layer_size(f"{option}[{i}]", size) for i, size in enumerate(value)]


def layer_size(option: str, value: object) -> int:
    # bool is an int in Python, and 1e12 is a float YAML gives for a typo: both are refused, not truncated.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_UNITS:
        raise SpecError(f"model.options.{option}: expected an integer from 1 to {MAX_UNITS}, got {value!r:.80}")
    return value


def flag(option: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"model.options.{option}: expected true or false, got {value!r:.80}")
    return value
