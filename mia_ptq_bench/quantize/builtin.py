"""The reference quantizers: fp32 (identity) and round-to-nearest on the study's grid."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from ..models import quantizable_layers
from ..spec.plans import PrecisionPlan, levels_for_bits
from .base import Quantizer, QuantizerConfig, register_quantizer
from .grid import as_rows, fit_grid


@register_quantizer("fp32")
class FullPrecision(Quantizer):
    """The unquantized model: the reference every board shows."""

    default_plans = ["fp32"]

    def unsupported(self, plan: PrecisionPlan) -> str | None:
        return None if plan.is_full_precision else "fp32 serves only the fp32 plan"

    def quantize(self, model: nn.Module, calibration: torch.Tensor, plan: PrecisionPlan) -> nn.Module:
        return model


class RTNConfig(QuantizerConfig):
    per_channel: bool = True
    search: Literal["lp", "minmax"] = Field("lp", description="L_p shrink search of the range, or plain min/max")
    p: float = Field(2.4, gt=0)
    steps: int = Field(80, ge=1, le=100)


@register_quantizer("rtn")
class RoundToNearest(Quantizer):
    """Each weight to the nearest point of its channel's grid; no calibration data used."""

    Config = RTNConfig

    @torch.no_grad()
    def quantize(self, model: nn.Module, calibration: torch.Tensor, plan: PrecisionPlan) -> nn.Module:
        cfg: RTNConfig = self.config  # type: ignore[assignment]
        layers = quantizable_layers(model)
        for index, (_, layer) in enumerate(layers):
            bits = plan.bits_for(index, len(layers))
            grid = fit_grid(layer.weight, levels_for_bits(bits), per_channel=cfg.per_channel, search=cfg.search,
                            p=cfg.p, steps=cfg.steps)
            layer.weight.copy_(grid.round_to_nearest(as_rows(layer.weight, grid)).view_as(layer.weight))
        return model
