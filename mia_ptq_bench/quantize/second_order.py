"""OBC and GPTQ as quantizers: Hessians from calibration data, then the sweeps of ``obs``."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn as nn
from pydantic import Field

from ..errors import BenchError

from ..models import quantizable_layers
from .base import register_quantizer
from .common import CalibratedQuantizer, GridConfig, set_weight
from .obs import NumericalError, accumulate_hessians, gptq_quantize, obc_quantize

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class HessianConfig(GridConfig):
    rounds: int = Field(1, ge=1, description="passes over the calibration set; rounds after the first are augmented")
    sequential: bool = Field(False, description="take each layer's Hessian from the model quantized so far")
    rel_damp: float = Field(0.0, ge=0, description="damping added to H, relative to its mean diagonal")
    fallback_damp: float = Field(0.01, gt=0, description="relative damping used only if H is singular")
    dtype: Literal["float32", "float64"] = Field("float32", description="precision of the sweep (H is accumulated in float64)")
    batch_size: int = Field(256, ge=1)


class _SecondOrder(CalibratedQuantizer):
    Config: ClassVar = HessianConfig

    def sweep(self, weight: torch.Tensor, hessian: torch.Tensor, grid) -> torch.Tensor:
        raise NotImplementedError

    def check_model(self, model) -> None:
        super().check_model(model)
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                raise BenchError(f"{self.name}: layer {name!r} is a grouped convolution (groups={module.groups}); "
                                 "its Hessian is not one matrix per layer, which this method needs")

    def _hessians(self, model, names: list[str], calibration) -> dict[str, torch.Tensor]:
        cfg: HessianConfig = self.config  # type: ignore[assignment]
        layers = {name: model.get_submodule(name) for name in names}
        batches = (batch for r in range(cfg.rounds) for batch in calibration.augmented(r).split(cfg.batch_size))
        hessians = accumulate_hessians(model, layers, batches)
        for name, hessian in hessians.items():
            if not torch.isfinite(hessian).all():
                raise BenchError(f"{self.name}: non-finite calibration activations reach layer {name!r}")
        return hessians

    def quantize_prepared(self, models, originals, calibrations, levels) -> None:
        cfg: HessianConfig = self.config  # type: ignore[assignment]
        names = [name for name, _ in quantizable_layers(models[0])]
        key = f"{self.name}-layers"
        self.progress.start(key, f"  {self.name}: {len(names)} layers × {len(models)} models", len(names) * len(models))
        for model, original, calibration in zip(models, originals, calibrations):
            hessians = {} if cfg.sequential else self._hessians(original, names, calibration)
            for name in names:
                hessian = self._hessians(model, [name], calibration)[name] if cfg.sequential else hessians[name]
                layer = model.get_submodule(name)
                grid = cfg.grid(layer.weight.detach(), levels[name])
                try:
                    quantized = self.sweep(layer.weight, hessian, grid)
                    if not torch.isfinite(quantized).all():
                        raise NumericalError("the quantized weights are not finite")
                except NumericalError as exc:
                    raise BenchError(f"{self.name}: the sweep over layer {name!r} ({hessian.shape[0]} inputs) became "
                                     f"numerically unstable ({exc}; too little calibration data for a full-rank "
                                     "Hessian?); set rel_damp > 0 or dtype float64") from None
                set_weight(model, name, quantized)
                self.progress.advance(key)


class OBCConfig(HessianConfig):
    calibration: int = Field(2048, ge=1, description="calibration images drawn from the target's members")
    rounds: int = Field(10, ge=1, description="passes over the calibration set; rounds after the first are augmented")
    parallel: int = Field(32, ge=1, description="rows swept together, each with its own inverse Hessian")


@register_quantizer("obc")
class OBC(_SecondOrder):
    """OBC / ExactOBS (Frantar & Alistarh, 2022): greedy per-row order, optimal updates of the rest."""

    Config = OBCConfig
    study_bn = "reestimate"

    def calibration_size(self, task_size: int) -> int:
        return self.config.calibration  # type: ignore[attr-defined]

    def sweep(self, weight, hessian, grid):
        cfg: OBCConfig = self.config  # type: ignore[assignment]
        return obc_quantize(weight, hessian, grid, parallel=cfg.parallel, rel_damp=cfg.rel_damp,
                            fallback_damp=cfg.fallback_damp, dtype=DTYPES[cfg.dtype])


class GPTQConfig(HessianConfig):
    sequential: bool = Field(True, description="take each layer's Hessian from the model quantized so far")
    rel_damp: float = Field(0.01, ge=0, description="damping added to H, relative to its mean diagonal")
    block_size: int = Field(128, ge=1)
    act_order: bool = Field(False, description="quantize columns by decreasing Hessian diagonal")


@register_quantizer("gptq")
class GPTQ(_SecondOrder):
    """GPTQ (Frantar et al., 2023): one column order for all rows, Cholesky-based lazy updates."""

    Config = GPTQConfig
    study_bn = "keep"

    def sweep(self, weight, hessian, grid):
        cfg: GPTQConfig = self.config  # type: ignore[assignment]
        return gptq_quantize(weight, hessian, grid, block_size=cfg.block_size, rel_damp=cfg.rel_damp,
                             act_order=cfg.act_order, fallback_damp=cfg.fallback_damp, dtype=DTYPES[cfg.dtype])
