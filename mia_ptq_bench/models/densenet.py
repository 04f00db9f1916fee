"""DenseNet121 with the CIFAR stem: torchvision's network, its stem replaced (3x3, stride 1, no pooling)."""

from __future__ import annotations

import torch.nn as nn
from torchvision.models.densenet import DenseNet, _DenseLayer, _Transition

from .base import BLOCKS, MODELS, scaled


@MODELS.register("densenet121")
def densenet121(input_shape: tuple[int, int, int], num_classes: int, width: float = 1.0) -> nn.Module:
    """torchvision's DenseNet121 with a 3x3 stride-1 stem and no stem pooling."""
    init_features = scaled(64, width)
    model = DenseNet(growth_rate=scaled(32, width), block_config=(6, 12, 24, 16),
                     num_init_features=init_features, num_classes=num_classes)
    model.features.conv0 = nn.Conv2d(input_shape[0], init_features, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(model.features.conv0.weight)
    model.features.pool0 = nn.Identity()
    return model


BLOCKS.add("dense-layer", _DenseLayer)
BLOCKS.add("dense-transition", _Transition)
