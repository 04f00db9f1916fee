"""Small networks for the CPU tasks: an MLP and a LeNet-style CNN."""

from __future__ import annotations

import torch.nn as nn

from .base import MODELS, scaled


@MODELS.register("mlp")
def mlp(input_shape: tuple[int, int, int], num_classes: int, width: float = 1.0, hidden: list[int] | None = None) -> nn.Module:
    sizes = [scaled(h, width) for h in (hidden if hidden is not None else [256])]
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
    layers: list[nn.Module] = []
    in_ch, side = input_shape[0], input_shape[1]
    for out in channels if channels is not None else [32, 64]:
        out = scaled(out, width)
        layers += [nn.Conv2d(in_ch, out, 3, padding=1, bias=not batchnorm)]
        layers += [nn.BatchNorm2d(out)] if batchnorm else []
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        in_ch, side = out, side // 2
    hidden = scaled(hidden, width)
    layers += [nn.Flatten(), nn.Linear(in_ch * side * side, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)
