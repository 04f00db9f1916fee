"""ResNet10/18/50 with the CIFAR stem (3x3 conv1, stride 1, no max-pool).

The ResNets follow torchvision's layout and module names exactly (conv1, bn1,
layer1..4, fc, downsample) so that weights are interchangeable at width 1; they
are written out only because torchvision's class cannot scale its widths, which
the tests need (width-8 nets).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import BLOCKS, MODELS, scaled


@BLOCKS.register("basic")
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


@BLOCKS.register("bottleneck")
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], depths: list[int], in_channels: int,
                 num_classes: int, width: float) -> None:
        super().__init__()
        planes = [scaled(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.in_planes = planes[0]
        self.layer1 = self._stage(block, planes[0], depths[0], 1)
        self.layer2 = self._stage(block, planes[1], depths[1], 2)
        self.layer3 = self._stage(block, planes[2], depths[2], 2)
        self.layer4 = self._stage(block, planes[3], depths[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes[3] * block.expansion, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, block: type[BasicBlock] | type[Bottleneck], planes: int, depth: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (depth - 1):
            blocks.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@MODELS.register("resnet10")
def resnet10(input_shape: tuple[int, int, int], num_classes: int, width: float = 1.0) -> nn.Module:
    """One BasicBlock per stage: the ResNet18 layout at half the depth, for CPU-sized pools.

    Stages 2-4 still open with a strided block and a downsampling shortcut, so block-wise
    reconstruction (BRECQ) meets every kind of residual block ResNet18 has.
    """
    return ResNet(BasicBlock, [1, 1, 1, 1], input_shape[0], num_classes, width)


@MODELS.register("resnet18")
def resnet18(input_shape: tuple[int, int, int], num_classes: int, width: float = 1.0) -> nn.Module:
    return ResNet(BasicBlock, [2, 2, 2, 2], input_shape[0], num_classes, width)


@MODELS.register("resnet50")
def resnet50(input_shape: tuple[int, int, int], num_classes: int, width: float = 1.0) -> nn.Module:
    return ResNet(Bottleneck, [3, 4, 6, 3], input_shape[0], num_classes, width)
