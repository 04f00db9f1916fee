"""Learned rounding (AdaRound), for one unit of several same-architecture models at once.

Each weight sits between two grid points, ``floor(w/s)`` and the next. A continuous
variable V per weight sets the soft choice ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``
(the rectified sigmoid); V starts where h equals the fractional part of ``w/s``, so the soft
weights start at the full-precision ones. Adam minimises the unit's output
reconstruction error plus ``lambda * sum(1 - |2h - 1|**beta)``, which is switched on after a
warm-up and pushes every h to 0 or 1 as beta anneals from 20 to 2. At the end each weight
rounds up where V >= 0.

The units of M models (same architecture, e.g. ten targets, or 64 shadows for the adaptive
attacker) are optimised together: parameters stacked along a model axis, the forward pass
vmapped. Adam is elementwise and the losses add up, so each model gets exactly its own
optimisation; the batching only amortises the per-step overhead. One kind of unit runs its
models one after another inside each step instead (``runs_per_model``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state

from .grid import Grid

GAMMA, ZETA = -0.1, 1.1


@dataclass(frozen=True)
class RoundingSchedule:
    iters: int
    batch_size: int
    lr: float
    reg_weight: float
    beta_start: float
    beta_end: float
    warmup: float
    seed: int


def beta_at(step: int, s: RoundingSchedule) -> float:
    """Linear decay from beta_start to beta_end after the warm-up (LinearTempDecay in the reference code)."""
    start = s.warmup * s.iters
    if step < start:
        return s.beta_start
    progress = (step - start) / max(1.0, s.iters - start)
    return s.beta_end + (s.beta_start - s.beta_end) * max(0.0, 1.0 - progress)


def soft_choice(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def initial_v(rest: torch.Tensor) -> torch.Tensor:
    """V with soft_choice(V) == rest, for rest in [0, 1)."""
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)


@dataclass
class _Layer:
    key: str  # parameter name of the weight inside the unit, e.g. "0.weight"
    shape: torch.Size  # (M, C_out, ...)
    floor: torch.Tensor  # (M, C, K)
    scale: torch.Tensor  # (M, C, 1)
    zero: torch.Tensor  # (M, C, 1)
    levels: int
    v: torch.Tensor  # (M, C, K), optimised

    def weights(self, rounding: torch.Tensor) -> torch.Tensor:
        integers = torch.clamp(self.floor + rounding + self.zero, 0, self.levels - 1)
        return ((integers - self.zero) * self.scale).reshape(self.shape)


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed over models (dim 0): the squared error summed over channels (dim 2), averaged over the rest.

    That is the reference code's lp_loss per model. Every model averages over as many values, so the
    sum is one fused sum of squares scaled once: the same gradient as the per-model formula, in one
    pass over the outputs instead of five (tests/test_methods.py checks both).
    """
    return F.mse_loss(output, target, reduction="sum") * (output.shape[0] * output.shape[2] / output.numel())


def runs_per_model(unit: nn.Module, device: torch.device) -> bool:
    """Whether a step runs the unit's models one by one, not vmapped: on a CPU, a convolution with one input channel.

    vmap turns the M models' convolutions into one grouped convolution. On a CPU that is faster for
    every unit of ResNet10 but its first, where each group has a single input channel: 7.4 ms per
    model-step vmapped against 4.3 ms for the same convolutions one by one, and looping every unit
    would be 1.6x slower (benchmarks/ptq_profile.py). Each model then computes exactly what it
    would alone. Unmeasured on CUDA, which keeps vmap.
    """
    first = next((m for m in unit.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    return device.type == "cpu" and isinstance(first, nn.Conv2d) and first.in_channels == 1


def one_by_one(function):
    """What ``torch.vmap(function)`` computes, computed one model after another: the same per-model ops as alone."""
    def run(params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([function({k: v[m] for k, v in params.items()}, {k: v[m] for k, v in buffers.items()}, x[m])
                            for m in range(x.shape[0])])
    return run


def learn_rounding(units: list[nn.Module], weight_keys: list[str], levels: dict[str, int],
                   grids: list[dict[str, Grid]], inputs: torch.Tensor, targets: torch.Tensor,
                   schedule: RoundingSchedule, per_model: bool | None = None,
                   ) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """Hard-rounded weights per model and key, for ``units`` (one per model) reconstructing ``targets``,
    and per model the fraction of soft choices that ended decided (within 0.01 of 0 or 1).

    inputs (M, n, ...) and targets (M, n, ...) are each model's captured unit inputs (from its
    partly quantized self) and full-precision outputs. ``per_model`` forces the models to run one by
    one (True) or vmapped (False) inside each step; by default ``runs_per_model`` chooses.
    """
    template = units[0]
    params, buffers = stack_module_state(units)
    params = {k: p.detach() for k, p in params.items()}
    layers = []
    for key in weight_keys:
        weight = params[key]
        rows = weight.reshape(weight.shape[0], weight.shape[1], -1)
        scale = torch.stack([g[key].scale for g in grids])
        zero = torch.stack([g[key].zero_point for g in grids])
        floor = torch.floor(rows / scale)
        v = initial_v(rows / scale - floor).clone().requires_grad_()
        layers.append(_Layer(key, weight.shape, floor, scale, zero, levels[key], v))

    def forward(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(template, {**p, **b}, (x,))

    if per_model is None:
        per_model = runs_per_model(template, inputs.device)
    batched = one_by_one(forward) if per_model else torch.vmap(forward)
    optimizer = torch.optim.Adam([layer.v for layer in layers], lr=schedule.lr)
    generator = torch.Generator().manual_seed(schedule.seed)
    count = inputs.shape[1]
    for step in range(schedule.iters):
        index = torch.randperm(count, generator=generator)[: schedule.batch_size].to(inputs.device)
        soft = {layer.key: layer.weights(soft_choice(layer.v)) for layer in layers}
        output = batched({**params, **soft}, buffers, inputs.index_select(1, index))
        loss = reconstruction_loss(output, targets.index_select(1, index))
        if step >= schedule.warmup * schedule.iters:
            beta = beta_at(step, schedule)
            for layer in layers:
                h = soft_choice(layer.v)
                loss = loss + schedule.reg_weight * (1 - (2 * h - 1).abs().pow(beta)).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        hard = {layer.key: layer.weights((layer.v >= 0).to(layer.v.dtype)) for layer in layers}
        decided = torch.stack([_decided(layer.v) for layer in layers]).sum(0)
        total = sum(layer.v[0].numel() for layer in layers)
    weights = [{key: value[m] for key, value in hard.items()} for m in range(len(units))]
    return weights, [float(d) / total for d in decided]


def _decided(v: torch.Tensor, margin: float = 0.01) -> torch.Tensor:
    """Per model, how many soft choices lie within ``margin`` of 0 or 1."""
    h = soft_choice(v)
    return ((h <= margin) | (h >= 1 - margin)).flatten(1).sum(1)
