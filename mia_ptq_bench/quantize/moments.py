"""AdaRound's reconstruction gradient from per-example moments, for a unit that is affine in its weight.

A layer unit that is one convolution (or linear layer) followed only by an eval-mode BatchNorm
or Identity maps each unfolded input patch x_p to ``a_c (w_c . x_p + bias_c) + b_c`` in output
channel c. Its squared error against the target t is then, for each channel, a quadratic in w_c
whose coefficients are sums over the example's positions: the second moment ``sum_p x~_p x~_p^T``
of the patches (x~ = x with a trailing 1, for the bias) and the cross moment ``sum_p x~_p t_p^T``.
Both are computed once per calibration example before the optimisation. A step then sums its
batch's moments (one ``embedding_bag`` over a table of them) and forms each model's weight gradient
with one small matrix product, instead of a forward convolution over every position and its
weight gradient. The gradient is the same in exact arithmetic; its float rounding differs.

It pays where the moments are smaller than the activations they summarise: few input channels
times kernel size against many positions, i.e. the early layers of a convnet (``worth_it``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# A step reads its batch's moments, (K + 1) x (K + 1 + C) numbers per example, where a convolution
# step does about 4 K C multiply-adds per position. On ResNet10's units with 16 models and 1,024
# examples (benchmarks/results/ptq_profile-fashion-mnist-resnet-20261204-2055.txt) the moments
# took 0.07-0.24x a grouped convolution's time per step where they were under 1/120 of that work,
# 0.66x at 1/77, 1.00x at 1/35 and 3.8-12x at 1/19 and beyond: their table (up to 1.7 GB) is read
# from memory, where the convolution's work is compute. (A small 1x1 shortcut at 1/41 was still
# 0.43x; the line leaves it out.)
WORK_PER_MOMENT = 50


@dataclass(frozen=True)
class AffineUnit:
    """A unit ``nn.Sequential(layer, [BatchNorm2d in eval mode], Identity...)``: its layer, and its
    BatchNorm's key prefix in the unit (or None) with that BatchNorm's eps."""

    layer: nn.Conv2d | nn.Linear
    batchnorm: str | None
    eps: float = 0.0

    @staticmethod
    def of(unit: nn.Module) -> AffineUnit | None:
        # Exact types, no hooks: a subclass or a hook could compute anything, and the moments
        # assume what these plain modules compute.
        if type(unit) is not nn.Sequential or len(unit) == 0 or any(_hooked(m) for m in unit.modules()):
            return None
        layer = unit[0]
        if type(layer) is nn.Conv2d:
            if layer.groups != 1 or layer.padding_mode != "zeros" or layer.padding == "same":
                return None
        elif type(layer) is not nn.Linear:
            return None
        batchnorm, eps = None, 0.0
        for index, module in list(unit.named_children())[1:]:
            if type(module) is nn.Identity:
                continue
            if (type(module) is nn.BatchNorm2d and type(layer) is nn.Conv2d and batchnorm is None
                    and not module.training and module.track_running_stats):
                batchnorm, eps = index, module.eps
                continue
            return None
        return AffineUnit(layer, batchnorm, eps)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, K + 1, positions): each position's input patch, in the weight's order, and a 1."""
        if isinstance(self.layer, nn.Conv2d):
            layer = self.layer
            padding = 0 if layer.padding == "valid" else layer.padding
            cols = F.unfold(x, layer.kernel_size, layer.dilation, padding, layer.stride)
        else:
            cols = x.reshape(x.shape[0], -1, 1)
        return torch.cat([cols, cols.new_ones(cols.shape[0], 1, cols.shape[2])], 1)

    def moments(self, inputs: torch.Tensor, targets: torch.Tensor, chunk: int = 128) -> torch.Tensor:
        """(n, M, K + 1, K + 1 + C) from example-major inputs (n, M, ...) and targets (n, M, C, ...):
        per example and model, the patches' second moment and their cross moment with the target."""
        n, models = inputs.shape[:2]
        table = None
        for m in range(models):
            for start in range(0, n, chunk):
                x = self.patches(inputs[start:start + chunk, m])
                t = targets[start:start + chunk, m].reshape(x.shape[0], -1, x.shape[2])
                block = torch.bmm(x, torch.cat([x, t], 1).transpose(1, 2))
                if table is None:
                    table = block.new_empty(n, models, *block.shape[1:])
                table[start:start + chunk, m] = block
        assert table is not None
        return table

    def positions(self, input_shape: torch.Size) -> int:
        if isinstance(self.layer, nn.Linear):
            return 1
        with torch.no_grad():
            return self.patches(torch.zeros(1, *input_shape, device=self.layer.weight.device)).shape[2]

    def table_bytes(self, examples: int, models: int) -> int:
        """The size of the moments' table for ``examples`` per model."""
        out_channels, fan_in = self.layer.weight.shape[0], self.layer.weight[0].numel()
        return examples * models * (fan_in + 1) * (fan_in + 1 + out_channels) * self.layer.weight.element_size()

    def worth_it(self, input_shape: torch.Size) -> bool:
        """Whether the moments are small against the work a convolution step does per example."""
        out_channels, fan_in = self.layer.weight.shape[0], self.layer.weight[0].numel()
        work = 4 * self.positions(input_shape) * fan_in * out_channels
        return (fan_in + 1) * (fan_in + 1 + out_channels) * WORK_PER_MOMENT <= work


class MomentGradient:
    """The reconstruction gradient with respect to a unit's (soft) weights, for M models at once.

    ``learn_rounding``'s loss is the squared error summed over models and channels and averaged over
    examples and positions; so is this gradient's.
    """

    def __init__(self, affine: AffineUnit, params: dict, buffers: dict, inputs: torch.Tensor,
                 targets: torch.Tensor) -> None:
        n, models = inputs.shape[:2]
        weight = params["0.weight"]
        self.shape = weight.shape
        out_channels = weight.shape[1]
        bias = params.get("0.bias")
        self.bias = (weight.new_zeros(models, out_channels) if bias is None else bias).unsqueeze(2)
        ones = weight.new_ones(models, out_channels)
        if affine.batchnorm is None:
            slope, shift = ones, torch.zeros_like(ones)
        else:
            prefix = affine.batchnorm
            gamma = params.get(f"{prefix}.weight", ones)
            beta = params.get(f"{prefix}.bias", torch.zeros_like(ones))
            slope = gamma / torch.sqrt(buffers[f"{prefix}.running_var"] + affine.eps)
            shift = beta - slope * buffers[f"{prefix}.running_mean"]
        self.slope, self.shift = slope.unsqueeze(2), shift.unsqueeze(2)
        table = affine.moments(inputs, targets)
        self.fan_in = table.shape[2] - 1
        self.block = table.shape[1:]
        self.table = table.reshape(n, -1)
        self.positions = affine.positions(inputs.shape[2:])

    def __call__(self, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """d loss / d weights (shaped like the stacked weight) for the examples ``index``."""
        summed = F.embedding_bag(index.unsqueeze(0), self.table, mode="sum").reshape(self.block)
        k = self.fan_in
        second, cross = summed[..., : k + 1], summed[..., k + 1:]
        rows = torch.cat([weights.reshape(self.shape[0], self.shape[1], -1), self.bias], 2)
        # Per channel: a (a G w~ + b G[:, K] - T_c), G the second moment's sum (symmetric), T the cross.
        residual = (torch.bmm(rows, second).mul_(self.slope)
                    .add_(self.shift * second[:, k:k + 1, :]).sub_(cross.transpose(1, 2)))
        scale = 2.0 / (index.numel() * self.positions)
        return residual[..., :k].mul_(self.slope * scale).reshape(self.shape)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)
