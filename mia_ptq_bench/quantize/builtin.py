"""The reference quantizers: fp32 (identity) and round-to-nearest on the study's grid."""

from __future__ import annotations

import torch.nn as nn

from ..models import quantizable_layers
from ..spec.plans import PrecisionPlan
from .base import Quantizer, register_quantizer
from .calibration import Calibration
from .common import CalibratedQuantizer, GridConfig, set_weight
from .grid import as_rows


@register_quantizer("fp32")
class FullPrecision(Quantizer):
    """The unquantized model: the reference every board shows."""

    default_plans = ["fp32"]

    def unsupported(self, plan: PrecisionPlan) -> str | None:
        return None if plan.is_full_precision else "fp32 serves only the fp32 plan"

    def quantize(self, model: nn.Module, calibration: Calibration, plan: PrecisionPlan) -> nn.Module:
        return model


@register_quantizer("rtn")
class RoundToNearest(CalibratedQuantizer):
    """Each weight to the nearest point of its channel's grid; calibration data unused (but by BN re-estimation)."""

    Config = GridConfig
    study_bn = "keep"
    uses_originals = False

    def quantize_prepared(self, models, originals, calibrations, levels) -> None:
        for name, _ in quantizable_layers(models[0]):
            layers = [model.get_submodule(name) for model in models]
            grids = self.config.grids([layer.weight.detach() for layer in layers], levels[name])
            for model, layer, grid in zip(models, layers, grids):
                set_weight(model, name, grid.round_to_nearest(as_rows(layer.weight.detach(), grid)).view_as(layer.weight))
