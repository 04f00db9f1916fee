"""What the calibrated quantizers share: grid settings, the BatchNorm policy, per-layer levels."""

from __future__ import annotations

import copy
from typing import ClassVar, Literal

import torch
import torch.nn as nn
from pydantic import Field

from ..errors import BenchError
from ..models import QUANTIZABLE, quantizable_layers
from ..models.structure import check_quantizable
from ..spec.plans import PrecisionPlan, levels_for_bits
from .base import Quantizer, QuantizerConfig
from .batchnorm import BNPolicy, conv_bn_pairs, fold_batchnorm, has_batchnorm, reestimate_batchnorm
from .calibration import Calibration
from .grid import Grid, fit_grid, fit_grids
from .memo import Replay, UnitMemo, content_key

# Normalisation layers scale each channel (LayerNorm's weight may have the shape of a whole map): no weight matrix.
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


class GridConfig(QuantizerConfig):
    per_channel: bool = Field(True, description="one grid per output channel (else one per tensor)")
    search: Literal["lp", "minmax"] = Field("lp", description="L_p shrink search of the range, or plain min/max")
    p: float = Field(2.4, gt=0)
    steps: int = Field(80, ge=1, le=100)
    bn: Literal["fold", "keep", "reestimate", "study"] = Field(
        "fold", description="BatchNorm policy; the same for every quantizer by default, 'study' = the method's own")

    def grid(self, weight: torch.Tensor, levels: int) -> Grid:
        return fit_grid(weight, levels, per_channel=self.per_channel, search=self.search, p=self.p, steps=self.steps)

    def grids(self, weights: list[torch.Tensor], levels: int) -> list[Grid]:
        """``grid`` for the same layer of several models, searched together (the same grids)."""
        return fit_grids(weights, levels, per_channel=self.per_channel, search=self.search, p=self.p, steps=self.steps)


def layer_levels(model: nn.Module, plan: PrecisionPlan) -> dict[str, int]:
    layers = quantizable_layers(model)
    return {name: levels_for_bits(plan.bits_for(i, len(layers))) for i, (name, _) in enumerate(layers)}


class CalibratedQuantizer(Quantizer):
    """Applies the BatchNorm policy around a method's ``quantize_prepared`` over a group of models."""

    Config: ClassVar[type[GridConfig]] = GridConfig
    study_bn: ClassVar[BNPolicy] = "fold"
    uses_originals: ClassVar[bool] = True  # False: quantize_prepared gets an empty list (a subclass that reads them sets True)
    # Whether a plan may replay the units an earlier plan quantized the same way (memo.py); a subclass
    # whose units read anything beyond the models, calibration, settings and earlier units sets False.
    replays: ClassVar[bool] = True
    # Whether each Conv2d, Linear and BatchNorm must be called once per forward pass (models.structure);
    # folding BatchNorm needs it too.
    single_calls: ClassVar[bool] = False
    _cache_names: ClassVar[tuple[str, ...]] = ("_memo",)

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self._start_caches()

    def _start_caches(self) -> None:
        """What the quantizer keeps in memory for the next plans; a subclass adds its own (and its name)."""
        self._memo = UnitMemo()

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        for name in self._cache_names:
            state.pop(name, None)  # worker processes start with empty caches
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._start_caches()

    def replay(self, models: list[nn.Module], calibrations: list[Calibration], steps: list) -> Replay:
        """The units an earlier plan quantized the same way on these models (call before changing them).

        ``steps`` describes each unit in the order they are quantized (its layers and their levels);
        only a method whose units depend on nothing but the units before them may replay (memo.py).
        """
        if not self.replays:
            return UnitMemo(budget=0).replay("", steps)  # knows nothing, keeps nothing
        settings = (self.name, self.version, self.config.model_dump_json())  # type: ignore[attr-defined]
        return self._memo.replay(content_key(models, calibrations, settings), steps)

    @property
    def bn_policy(self) -> BNPolicy:
        chosen = self.config.bn  # type: ignore[attr-defined]
        return self.study_bn if chosen == "study" else chosen

    def quantize(self, model: nn.Module, calibration: Calibration, plan: PrecisionPlan) -> nn.Module:
        return self.quantize_many([model], [calibration], plan)[0]

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model with weighted layers the benchmark's weight-only quantizers cannot handle."""
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if (isinstance(weight, torch.Tensor) and weight.ndim >= 2 and not isinstance(module, (*QUANTIZABLE, *NORMS))):
                raise BenchError(f"{self.name}: layer {name!r} is a {type(module).__name__}; the quantizers cannot "
                                 "quantize it (supported: Conv2d, Linear)")

    def quantize_many(self, models: list[nn.Module], calibrations: list[Calibration], plan: PrecisionPlan) -> list[nn.Module]:
        if _overrides_quantize_only(type(self)) and not getattr(self, "_in_own_quantize", False):
            # A subclass that wrote its own quantize (and no quantize_many) is that method, one model at a
            # time; its quantize may still call super().quantize, which comes back here for the built-in way.
            self._in_own_quantize = True
            try:
                return [self.quantize(m, c, plan) for m, c in zip(models, calibrations)]
            finally:
                self._in_own_quantize = False
        for model in models:
            self.check_model(model)
        # The group shares one architecture. Folding needs single calls only where there is BatchNorm to fold.
        folds = self.bn_policy == "fold" and has_batchnorm(models[0])
        check_quantizable(models[0], calibrations[0].images[:2], once=self.single_calls or folds)
        models = [m.eval() for m in models]
        if self.bn_policy == "fold":
            pairs = conv_bn_pairs(models[0])  # traced once: the group shares one architecture
            models = [fold_batchnorm(m, pairs) for m in models]
        sizes = sorted({len(c) for c in calibrations})
        if len(sizes) > 1:  # cutting them to the smallest would make a model's result depend on its group
            raise BenchError(f"{self.name}: the models of one group need calibration sets of one size, got {sizes} "
                             "(calibration.calibration_set gives every pool model of a task the same count)")
        originals = [copy.deepcopy(m) for m in models] if self.uses_originals else []
        self.quantize_prepared(models, originals, calibrations, layer_levels(models[0], plan))
        if self.bn_policy == "reestimate":
            models = [reestimate_batchnorm(m, c.images) for m, c in zip(models, calibrations)]
        return models

    def quantize_prepared(self, models: list[nn.Module], originals: list[nn.Module], calibrations: list[Calibration],
                          levels: dict[str, int]) -> None:
        """Quantize ``models`` in place; ``originals`` are their full-precision copies (BN policy applied)."""
        raise NotImplementedError


def _overrides_quantize_only(cls: type) -> bool:
    """Whether ``cls`` defines ``quantize`` below the class that defines its ``quantize_many``."""
    def defining(name: str) -> type:
        return next(k for k in cls.__mro__ if name in k.__dict__)
    own, batched = defining("quantize"), defining("quantize_many")
    return own is not batched and issubclass(own, batched)


def set_weight(model: nn.Module, layer_name: str, weight: torch.Tensor) -> None:
    with torch.no_grad():
        model.get_submodule(layer_name).weight.copy_(weight)
