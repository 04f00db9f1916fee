"""Stochastic rounding: the worked example of a submitted quantizer.

Each weight rounds up to the next grid point with probability equal to how far it
sits towards it (and down otherwise), on the same per-channel grid as round-to-nearest.
The rounding is unbiased in expectation but noisier than RTN: does the noise buy privacy?
"""

from __future__ import annotations

import torch
from pydantic import Field

from mia_ptq_bench.plugin import Calibration, PrecisionPlan, Quantizer, QuantizerConfig, fit_grid, layer_levels


class StochasticRoundingConfig(QuantizerConfig):
    seed: int = Field(0, description="seed of the rounding draws")


class StochasticRounding(Quantizer):
    """Rounds each weight up with probability equal to its fractional position between two grid points."""

    name = "example-stochastic-rounding"
    version = "1.0"
    Config = StochasticRoundingConfig

    @torch.no_grad()
    def quantize(self, model: torch.nn.Module, calibration: Calibration, plan: PrecisionPlan) -> torch.nn.Module:
        generator = torch.Generator().manual_seed(self.config.seed)
        for name, levels in layer_levels(model, plan).items():
            weight = model.get_submodule(name).weight
            grid = fit_grid(weight, levels)  # per output channel, L2.4 range search
            position = weight.reshape(grid.scale.shape[0], -1) / grid.scale
            up = torch.rand(position.shape, generator=generator).to(position.device) < position - position.floor()
            integers = torch.clamp(position.floor() + up + grid.zero_point, 0, levels - 1)
            weight.copy_(grid.dequantize(integers).view_as(weight))
        return model
