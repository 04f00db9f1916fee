"""Architectures behind a registry, built from a task's ModelSpec."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import SpecError
from ..spec.schema import ModelSpec
from . import densenet as _densenet  # noqa: F401  (registers the built-in models)
from . import resnet as _resnet  # noqa: F401
from . import small as _small  # noqa: F401
from .base import BLOCKS, MODELS, QUANTIZABLE, quantizable_layers


def build_model(spec: ModelSpec, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    factory = MODELS.get(spec.arch)
    try:
        return factory(input_shape, num_classes, width=spec.width, **spec.options)
    except TypeError as exc:
        raise SpecError(f"model.options: {spec.arch} does not accept these options: {exc}") from None
    except ValueError as exc:  # an extension's factory refusing its options
        raise SpecError(f"model.options: {spec.arch} refuses these options: {exc}") from None


def build_meta_model(spec: ModelSpec, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The model on PyTorch's ``meta`` device: shapes only, nothing allocated; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return build_model(spec, input_shape, num_classes)


def quantizable_layer_names(spec: ModelSpec, input_shape: tuple[int, int, int], num_classes: int) -> list[str]:
    """The names of the model's quantizable layers in order, as a bit-width audit lists them."""
    return [name for name, _ in quantizable_layers(build_meta_model(spec, input_shape, num_classes))]


__all__ = ["BLOCKS", "MODELS", "QUANTIZABLE", "build_meta_model", "build_model", "quantizable_layer_names",
           "quantizable_layers"]
