"""OBC and GPTQ as quantizers: Hessians from calibration data, then the sweeps of ``obs``."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn as nn
from pydantic import Field

from ..errors import BenchError
from ..models import quantizable_layers
from .base import register_quantizer
from .calibration import Calibration
from .common import CalibratedQuantizer, GridConfig, set_weight
from .memo import content_key
from .obs import HessianAccumulator, NumericalError, accumulate_hessians, gptq_quantize_many, obc_quantize_many
from .units import ForwardCursor, Unit, call_order, carry_fits, forward_plan

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class HessianConfig(GridConfig):
    rounds: int = Field(1, ge=1, description="passes over the calibration set; rounds after the first are augmented")
    sequential: bool = Field(False, description="take each layer's Hessian from the model quantized so far")
    rel_damp: float = Field(0.0, ge=0, description="damping added to H, relative to its mean diagonal")
    fallback_damp: float = Field(0.01, gt=0, description="relative damping used only if H is singular")
    dtype: Literal["float32", "float64"] = Field("float32", description="precision of the sweep (H is accumulated in float64)")
    batch_size: int = Field(256, ge=1)


# Hessians taken from the full-precision model (``sequential: false``, OBC's way) do not depend on
# the plan, so a quantizer keeps them for the next plans of the same models (the runner quantizes
# every plan with one quantizer object): at most this many bytes, least recently used dropped first.
HESSIAN_CACHE_BYTES = 1 << 30


class _HessianCache:
    """Full-precision Hessians by content: the model's weights, the calibration images and the settings.

    Every plan of a grid reads the same models' Hessians in the same order. Where they do not all fit,
    the newest entry makes room for the next one and the older ones stay: each plan then finds all
    but the last few. (Dropping the least recently used one would, in that cyclic order, drop each
    model's Hessians just before the next plan asks for them, and find none.)
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.entries: dict[str, dict[str, torch.Tensor]] = {}

    @staticmethod
    def key(model: nn.Module, calibration: Calibration, names: list[str], settings: tuple) -> str:
        return content_key([model], [calibration], (names, settings))

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        return self.entries.get(key)

    def put(self, key: str, hessians: dict[str, torch.Tensor]) -> None:
        size = _bytes(hessians)
        if size > self.budget:
            return
        while self.entries and sum(_bytes(e) for e in self.entries.values()) + size > self.budget:
            self.entries.popitem()  # the newest
        self.entries[key] = hessians


def _bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class _SecondOrder(CalibratedQuantizer):
    Config: ClassVar = HessianConfig

    _cache_names = ("_memo", "_hessian_cache")

    @property
    def uses_originals(self) -> bool:  # type: ignore[override]
        # Sequential Hessians come from the models as they are being quantized: no full-precision copy
        # is read, so none is made (a deep copy per model, about 4% of GPTQ's time on ResNet10).
        return not self.config.sequential  # type: ignore[attr-defined]

    def _start_caches(self) -> None:
        super()._start_caches()
        self._hessian_cache = _HessianCache(HESSIAN_CACHE_BYTES)

    def sweep(self, weight: torch.Tensor, hessian: torch.Tensor, grid) -> torch.Tensor:
        raise NotImplementedError

    def sweep_many(self, weights: list[torch.Tensor], hessians: list[torch.Tensor], grids: list) -> list[torch.Tensor]:
        """The same layer of several models; methods whose sweep batches across models override this."""
        return [self.sweep(w, h, g) for w, h, g in zip(weights, hessians, grids)]

    def check_model(self, model) -> None:
        super().check_model(model)
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                raise BenchError(f"{self.name}: layer {name!r} is a grouped convolution (groups={module.groups}); "
                                 "its Hessian is not one matrix per layer, which this method needs")

    def _batches(self, calibration) -> list[torch.Tensor]:
        cfg: HessianConfig = self.config  # type: ignore[assignment]
        return [batch for r in range(cfg.rounds) for batch in calibration.augmented(r).split(cfg.batch_size)]

    def _hessians(self, model, names: list[str], calibration) -> dict[str, torch.Tensor]:
        layers = {name: model.get_submodule(name) for name in names}
        hessians = accumulate_hessians(model, layers, self._batches(calibration))
        for name, hessian in hessians.items():
            _check_finite(self.name, name, hessian)
        return hessians

    def _original_hessians(self, original, names: list[str], calibration) -> dict[str, torch.Tensor]:
        """Every layer's Hessian from the full-precision model: one pass, remembered for the next plans."""
        cfg: HessianConfig = self.config  # type: ignore[assignment]
        key = _HessianCache.key(original, calibration, names, (cfg.rounds, cfg.batch_size))
        found = self._hessian_cache.get(key)
        if found is None:
            found = self._hessians(original, names, calibration)
            self._hessian_cache.put(key, found)
        return found

    def quantize_prepared(self, models, originals, calibrations, levels) -> None:
        cfg: HessianConfig = self.config  # type: ignore[assignment]
        names = [name for name, _ in quantizable_layers(models[0])]
        key = f"{self.name}-layers"
        self.progress.start(key, f"  {self.name}: {len(names)} layers × {len(models)} models", len(names) * len(models))
        cursors = None
        if cfg.sequential:
            # Each layer's Hessian from the model quantized so far: the models' forward passes are
            # carried from layer to layer (units.ForwardCursor) instead of re-run from the input.
            units = [Unit(name, layer, layer, layer, {"": name}) for name, layer in quantizable_layers(models[0])]
            # Layers in the order the forward pass reaches them (the traced graph's, else a probe pass's),
            # whether or not the carried passes fit in memory (else each layer's Hessian comes from a pass
            # from the images).
            plan = forward_plan(models[0], units)
            names = [names[u] for u in (plan.order if plan is not None else
                                        call_order(models[0], units, calibrations[0].images[:2]))]
            if plan is not None:
                images = calibrations[0].images
                if carry_fits(models[0], plan, images[:1], cfg.rounds * len(images), len(models)):
                    cursors = [ForwardCursor(m, plan, self._batches(c)) for m, c in zip(models, calibrations)]
                    position = {name: u for u, name in enumerate(n for n, _ in quantizable_layers(models[0]))}
            fixed = None
        else:
            fixed = [self._original_hessians(o, names, c) for o, c in zip(originals, calibrations)]
        # The leading layers an earlier plan quantized at the same levels on these models are replayed (memo.py).
        replay = self.replay(models, calibrations, [(name, levels[name]) for name in names])
        for step, name in enumerate(names):
            known = replay.known(step)
            if known is not None:
                for model, per_model in zip(models, known):
                    set_weight(model, name, per_model[name])
                self.progress.advance(key, len(models))
                continue
            layers = [m.get_submodule(name) for m in models]
            if fixed is not None:
                hessians = [h[name] for h in fixed]
            elif cursors is not None:
                hessians = []
                for cursor, layer in zip(cursors, layers):
                    accumulator = HessianAccumulator(layer)
                    for value in cursor.inputs_per_batch(position[name]):
                        accumulator.add(value)
                    hessians.append(_check_finite(self.name, name, accumulator.hessian))
            else:
                hessians = [self._hessians(m, [name], c)[name] for m, c in zip(models, calibrations)]
            grids = cfg.grids([layer.weight.detach() for layer in layers], levels[name])
            try:
                quantized = self.sweep_many([layer.weight for layer in layers], hessians, grids)
                if not all(torch.isfinite(q).all() for q in quantized):
                    raise NumericalError("the quantized weights are not finite")
            except NumericalError as exc:
                raise BenchError(f"{self.name}: the sweep over layer {name!r} ({hessians[0].shape[0]} inputs) became "
                                 f"numerically unstable ({exc}; too little calibration data for a full-rank "
                                 "Hessian?); set rel_damp > 0 or dtype float64") from None
            for model, q in zip(models, quantized):
                set_weight(model, name, q)
            replay.remember(step, [{name: q} for q in quantized])
            self.progress.advance(key, len(models))


def _check_finite(method: str, name: str, hessian: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(hessian).all():
        raise BenchError(f"{method}: non-finite calibration activations reach layer {name!r}")
    return hessian


class OBCConfig(HessianConfig):
    calibration: int = Field(2048, ge=1, description="calibration images drawn from the target's members")
    rounds: int = Field(10, ge=1, description="passes over the calibration set; rounds after the first are augmented")
    parallel: int = Field(32, ge=1, description="rows swept together, each with its own inverse Hessian")


@register_quantizer("obc")
class OBC(_SecondOrder):
    """OBC / ExactOBS (Frantar & Alistarh, 2022): greedy per-row order, optimal updates of the rest."""

    Config = OBCConfig
    study_bn = "reestimate"
    # 2: calibrated on the fewest members of any pool model where it asks for more images (2,048) than
    # some models have (quantize/calibration.calibration_count); 1 cut each group to its own fewest.
    # 3: a Hessian counts as singular by a rank tolerance, not by whether its Cholesky happens to fail
    # (obs.inverse_hessian): an exactly singular H no longer goes undamped on CPUs whose rounding leaves
    # a positive last pivot.
    version = "3"

    def calibration_size(self, task_size: int) -> int:
        return self.config.calibration  # type: ignore[attr-defined]

    def sweep(self, weight, hessian, grid):
        return self.sweep_many([weight], [hessian], [grid])[0]

    def sweep_many(self, weights, hessians, grids):
        # The rows of every model go through one sweep (obs.obc_quantize_many): bit for bit what
        # each model would get alone, with the per-step overhead shared.
        cfg: OBCConfig = self.config  # type: ignore[assignment]
        return obc_quantize_many(weights, hessians, grids, parallel=cfg.parallel, rel_damp=cfg.rel_damp,
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
    # 2: singular Hessians decided by a rank tolerance, as OBC's version 3 (obs.inverse_hessian).
    version = "2"

    def sweep(self, weight, hessian, grid):
        return self.sweep_many([weight], [hessian], [grid])[0]

    def sweep_many(self, weights, hessians, grids):
        # One column loop for every model (obs.gptq_quantize_many): each model's own result, with the
        # per-column overhead shared.
        cfg: GPTQConfig = self.config  # type: ignore[assignment]
        return gptq_quantize_many(weights, hessians, grids, block_size=cfg.block_size, rel_damp=cfg.rel_damp,
                                  act_order=cfg.act_order, fallback_damp=cfg.fallback_damp, dtype=DTYPES[cfg.dtype])
