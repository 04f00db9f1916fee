"""AdaRound (layer by layer) and BRECQ (block by block): learned rounding that reconstructs outputs.

Both walk the model's units in order. For each, the unit's input is captured from the
model as quantized so far (the reference code's ``asym=True``) and its target output
from the full-precision copy; the rounding of every weight in the unit is then learned
(``rounding.learn_rounding``) and fixed. Several models go through together, each
model's forward pass carried from unit to unit where the model traces (``units.ForwardCursor``).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from ..errors import BenchError
from .base import register_quantizer
from .common import CalibratedQuantizer, GridConfig, set_weight
from .rounding import RoundingSchedule, choose_way, learn_rounding
from .units import ForwardCursor, Unit, block_units, call_order, capture, carry_fits, forward_plan, layer_units


# The study runs 20,000 Adam steps per unit at lr 1e-3. On two CPU cores the benchmark's default is a
# tenth of the steps at ten times the rate (docs/quantizers.md has what that changes, measured);
# `--set iters=20000 --set lr=0.001` is the study's setting.
class ReconstructionConfig(GridConfig):
    iters: int = Field(2000, ge=1, description="Adam steps per unit (the study: 20,000)")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-2, gt=0, description="Adam's learning rate on the rounding variables (the study: 1e-3)")
    reg_weight: float = Field(0.001, ge=0, description="weight of the rounding regulariser")
    beta_start: float = Field(20.0, gt=0)
    beta_end: float = Field(2.0, gt=0)
    warmup: float = Field(0.2, ge=0, lt=1, description="fraction of steps before the regulariser starts")
    inputs: Literal["quantized", "full_precision"] = Field(
        "quantized", description="capture unit inputs from the partly quantized model (reference) or the original")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="seeds the calibration batches each step draws")
    capture_batch: int = Field(256, ge=1)

    def schedule(self) -> RoundingSchedule:
        return RoundingSchedule(self.iters, self.batch_size, self.lr, self.reg_weight, self.beta_start,
                                self.beta_end, self.warmup, self.seed)


class _Reconstruction(CalibratedQuantizer):
    Config = ReconstructionConfig
    granularity: ClassVar[str] = "layer"
    single_calls = True  # a unit's input and target come from one call of its layers
    # 2: V's gradient written out by hand (rounding._Layer.set_gradient): the same derivative,
    # other float rounding, so a few roundings may differ from version 1's.
    version: ClassVar[str] = "2"
    # Whether a unit affine in its weight may take its steps' gradient from per-example moments
    # (rounding.moments_pay): the same gradient, other float rounding.
    moments: ClassVar[bool] = False
    runs_long: ClassVar[bool] = True  # iters optimisation steps per unit (base.Quantizer.runs_long)

    def units(self, model) -> list[Unit]:
        return layer_units(model) if self.granularity == "layer" else block_units(model)

    def quantize_prepared(self, models, originals, calibrations, levels) -> None:
        cfg: ReconstructionConfig = self.config  # type: ignore[assignment]
        quantized_units = [self.units(m) for m in models]
        original_units = [self.units(o) for o in originals]
        count = len(quantized_units[0])
        sources = models if cfg.inputs == "quantized" else originals
        source_units = quantized_units if cfg.inputs == "quantized" else original_units
        # Units go in the order the forward pass reaches them: from the traced graph where the model traces
        # (for the built-in models that differs from registration order only for a shortcut, whose input
        # and target do not depend on it), from a probe pass's calls elsewhere. Their inputs and targets come from forward passes
        # carried from unit to unit (units.ForwardCursor: the values ``capture`` gives, bit for bit) where
        # the carried values fit in memory, else from a pass from the images per unit and model: the same
        # order and values either way, so the machine's memory changes no result.
        plan = forward_plan(models[0], quantized_units[0], blocks=self.granularity == "block")
        order = plan.order if plan is not None else call_order(models[0], quantized_units[0], calibrations[0].images[:2])
        cursors = len(models) * (1 if cfg.inputs == "full_precision" else 2)
        images = calibrations[0].images
        if plan is not None and not carry_fits(models[0], plan, images[:1], len(images), cursors):
            plan = None
        if plan is not None:
            batches = [list(cal.images.split(cfg.capture_batch)) for cal in calibrations]
            target_cursors = [ForwardCursor(o, plan, b) for o, b in zip(originals, batches)]
            source_cursors = (target_cursors if cfg.inputs == "full_precision"
                              else [ForwardCursor(m, plan, b) for m, b in zip(models, batches)])
        key = f"{self.name}-units"
        self.progress.start(key, f"  {self.name}: {count} {self.granularity}s × {len(models)} models", count)
        # A unit is described by its layers' levels: the leading units an earlier plan quantized the
        # same way on these models are replayed, not redone (memo.py).
        replay = self.replay(models, calibrations, [tuple((layer, levels[layer]) for layer in
                                                          quantized_units[0][u].layers.values()) for u in order])
        for position, u in enumerate(order):
            weights = replay.known(position)
            if weights is None:
                if plan is not None:
                    # Example-major, the models side by side: what learn_rounding reads without copying.
                    inputs = torch.stack([cursor.input_of(u) for cursor in source_cursors], dim=1)
                    targets = torch.stack([cursor.output_of(u) for cursor in target_cursors], dim=1)
                else:
                    inputs = torch.stack([capture(src, su[u].first, cal.images, "input", cfg.capture_batch)
                                          for src, su, cal in zip(sources, source_units, calibrations)], dim=1)
                    targets = torch.stack([capture(orig, ou[u].last, cal.images, "output", cfg.capture_batch)
                                           for orig, ou, cal in zip(originals, original_units, calibrations)], dim=1)
                weights = self._learn_unit(models, [qu[u] for qu in quantized_units], inputs, targets, levels)
                replay.remember(position, weights)
            for model, per_model in zip(models, weights):
                for layer, weight in per_model.items():
                    set_weight(model, layer, weight)
            self.progress.advance(key)

    def _learn_unit(self, models, units: list[Unit], inputs: torch.Tensor, targets: torch.Tensor,
                    levels: dict[str, int]) -> list[dict[str, torch.Tensor]]:
        """One unit's learned rounding for every model: per model, layer name -> quantized weight."""
        cfg: ReconstructionConfig = self.config  # type: ignore[assignment]
        if not (torch.isfinite(inputs).all() and torch.isfinite(targets).all()):
            raise BenchError(f"{self.name}: non-finite calibration activations at {units[0].name}")
        unit_layers = units[0].layers
        keys = [f"{prefix}.weight" for prefix in unit_layers]
        per_layer = {prefix: cfg.grids([model.get_submodule(layer).weight.detach() for model in models], levels[layer])
                     for prefix, layer in unit_layers.items()}
        grids = [{f"{prefix}.weight": per_layer[prefix][i] for prefix in unit_layers} for i in range(len(models))]
        unit_levels = {f"{prefix}.weight": levels[layer] for prefix, layer in unit_layers.items()}
        modules = [unit.module for unit in units]
        way = None if self.moments else choose_way(modules[0], len(modules), inputs.device)
        with torch.enable_grad():
            hard, _ = learn_rounding(modules, keys, unit_levels, grids, inputs, targets, cfg.schedule(), way)
        return [{layer: weights[f"{prefix}.weight"] for prefix, layer in unit_layers.items()} for weights in hard]


@register_quantizer("adaround")
class AdaRound(_Reconstruction):
    """AdaRound (Nagel et al., 2020): learned rounding, reconstructing each layer's own output."""

    granularity = "layer"
    study_bn = "keep"
    # 3: the early convolutions' steps take their gradient from per-example moments (moments.py):
    # 1.7x faster steps on ResNet10, other float rounding than version 2.
    # 4: every unit is the layer alone, its target the layer's own output, as in the study's code;
    # version 3 took in the ReLU after a layer where that module runs once (a model's stem, an MLP's
    # layers) but not after a residual block's conv1, whose ReLU module runs twice.
    version = "4"
    moments = True


class BRECQConfig(ReconstructionConfig):
    reg_weight: float = Field(0.01, ge=0, description="weight of the rounding regulariser")


@register_quantizer("brecq")
class BRECQ(_Reconstruction):
    """BRECQ (Li et al., 2021): learned rounding, reconstructing each residual/dense block's output."""

    Config = BRECQConfig
    granularity = "block"
    study_bn = "fold"
    # Its layer units are a model's stem and classifier, where moments do not pay (a ReLU in the
    # unit, or a linear layer): it keeps the convolutions, and version 2 its bits.
