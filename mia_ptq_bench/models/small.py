"""Small networks for the CPU tasks: an MLP and a LeNet-style CNN."""

from __future__ import annotations

import torch.nn as nn

from ..errors import SpecError
from .base import MODELS, flag, layer_size, layer_sizes, scaled


@MODELS.register("mlp")
def mlp(input_shape: tuple[int, int, int], num_classes: int, width: float = 1.0, hidden: list[int] | None = None) -> nn.Module:
    sizes = [scaled(h, width) for h in (layer_sizes("hidden", hidden) if hidden is not None else [256])]
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = input_shape[0] * input_shape[1] * input_shape[2]
    for size in sizes:
        layers += [nn.Linear(fan_in, size), nn.ReLU()]
        fan_in = size
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)


@MODELS.register("cnn")
def cnn(input_shape: tuple[int, int, int], num_classes: int, width: float = 1.0, channels: list[int] | None = None,
        hidden: int = 128, batchnorm: bool = False) -> nn.Module:
    """Conv(3x3)-[BN]-ReLU-MaxPool stages, then one hidden Linear layer and the classifier."""
    channels = layer_sizes("channels", channels, max_layers=8) if channels is not None else [32, 64]
    hidden, batchnorm = layer_size("hidden", hidden), flag("batchnorm", batchnorm)
    if input_shape[1] >> len(channels) < 1:  # each stage halves the side: none may be left
        raise SpecError(f"model.options.channels: {len(channels)} pooling stages need images of at least "
                        f"{2 ** len(channels)} pixels, these have {input_shape[1]}")
    layers: list[nn.Module] = []
    in_ch, side = input_shape[0], input_shape[1]
    for out in channels:
        out = scaled(out, width)
        layers += [nn.Conv2d(in_ch, out, 3, padding=1, bias=not batchnorm)]
        layers += [nn.BatchNorm2d(out)] if batchnorm else []
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        in_ch, side = out, side // 2
    hidden = scaled(hidden, width)
    layers += [nn.Flatten(), nn.Linear(in_ch * side * side, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)
