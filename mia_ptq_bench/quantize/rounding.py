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
vmapped, or for a unit of convolutions, ReLUs and additions (AdaRound's layers, BRECQ's
residual blocks) with each convolution one grouped convolution (``grouped_forward``). Adam is
elementwise and the losses add up, so each model gets its own
optimisation; the batching only amortises the per-step overhead. One kind of unit runs its
models one after another inside each step instead (``runs_per_model``).

Autograd runs only through the unit itself: the soft weights enter it as leaves, and V's gradient
(rectified sigmoid, grid clamp, regulariser) is written out in ``_Layer.set_gradient``. That is the
same derivative in about a dozen elementwise passes over V instead of some forty (counted from the
operations each way runs): 1.2x (AdaRound) and 1.1x (BRECQ) faster per step on ResNet10, about
1.4-1.5x on its weight-heavy last layers (docs/quantizers.md).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.fx as fx
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state

from ..pool.train import memory_share
from .grid import Grid
from .moments import AffineUnit, MomentGradient

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
    v: torch.Tensor  # (M, C, K), optimised; its gradient is written by ``set_gradient``

    def __post_init__(self) -> None:
        # A weight whose lower grid point is the grid's last, or below its first, is pinned there by
        # the clamp whatever h is: its soft weight is a constant. Every other one is offset + slope * h.
        base = self.floor + self.zero
        movable = (base >= 0) & (base <= self.levels - 2)
        self.slope = torch.where(movable, self.scale, 0.0)
        self.offset = torch.where(movable, self.floor * self.scale, self.rows(torch.zeros_like(self.v)))

    def rows(self, rounding: torch.Tensor) -> torch.Tensor:
        integers = torch.clamp(self.floor + rounding + self.zero, 0, self.levels - 1)
        return (integers - self.zero) * self.scale

    def weights(self, rounding: torch.Tensor) -> torch.Tensor:
        return self.rows(rounding).reshape(self.shape)

    def soft_weights(self) -> torch.Tensor:
        """The weights at the current soft choices h(V), as a leaf that collects its gradient."""
        with torch.no_grad():
            self.sigmoid = torch.sigmoid(self.v)
            self.unclipped = self.sigmoid * (ZETA - GAMMA) + GAMMA
            self.h = self.unclipped.clamp(0, 1)
            return torch.addcmul(self.offset, self.slope, self.h).reshape(self.shape).requires_grad_()

    def set_gradient(self, weight_grad: torch.Tensor, reg_weight: float, beta: float | None) -> None:
        """V's gradient of the reconstruction loss (through ``weight_grad``) plus, when ``beta`` is set,
        of ``reg_weight * sum(1 - |2h - 1|**beta)``: the chain rule written out, so a step makes a
        dozen passes over V instead of autograd's forty-odd for the same derivative."""
        with torch.no_grad():
            grad_h = weight_grad.reshape(self.v.shape) * self.slope
            if beta is not None:
                t = self.h * 2 - 1
                grad_h.add_(t.abs().pow_(beta - 1).mul_(t.sgn()), alpha=-2 * reg_weight * beta)
            # The rectified sigmoid passes gradient strictly inside its clip, as torch's clamp does; at a
            # movable weight that also covers the grid clamp, whose ends h then sits at.
            inside = (self.unclipped > 0) & (self.unclipped < 1)
            grad_h = torch.where(inside, grad_h, 0.0).mul_(ZETA - GAMMA)
            self.v.grad = torch.ops.aten.sigmoid_backward(grad_h, self.sigmoid)


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor, model_channels: int) -> torch.Tensor:
    """Summed over models: each model's squared error summed over its channels, averaged over the rest.

    That is the reference code's lp_loss per model; ``model_channels`` is how many (model, channel)
    pairs ``output`` holds, in any layout. Every model averages over as many values, so the sum is
    one fused sum of squares scaled once: the same gradient as the per-model formula, in one pass
    over the outputs instead of five (tests/test_methods.py checks both).
    """
    return F.mse_loss(output, target, reduction="sum") * (model_channels / output.numel())


def reconstruction_gradient(output: torch.Tensor, target: torch.Tensor, model_channels: int) -> torch.Tensor:
    """The gradient of ``reconstruction_loss`` with respect to ``output``, without computing the loss:
    the optimisation only ever needs this."""
    return torch.sub(output, target).mul_(2 * model_channels / output.numel())


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


# Operations that act the same on each model's channels when the models sit side by side along them.
_SIDE_BY_SIDE_FUNCTIONS = {operator.add, torch.add, torch.relu, F.relu}


def grouped_forward(template: nn.Module, models: int):
    """The unit's forward pass for all models at once, each convolution one grouped convolution, or
    None unless the unit's traced graph holds only Conv2d, BatchNorm2d in eval mode, ReLU, Identity
    and additions: an AdaRound layer unit, or a BRECQ residual block (a DenseNet layer concatenates
    channels, so it stays with vmap).

    Its input and output hold the models side by side along the channels, (batch, models x channels,
    H, W): the example-major activations of ``learn_rounding`` viewed without a copy. vmap builds
    the same grouped convolutions but moves the model axis in and out of the channels around every
    operation: 1.12x faster per step over ResNet10's 15 units, 0.98-1.30x unit by unit
    (docs/quantizers.md). The same sums, in the same or another order: results agree with vmap's up
    to float rounding.
    """
    try:
        graph = fx.symbolic_trace(template)
    except Exception:  # untraceable control flow: vmap handles it
        return None
    modules = dict(graph.named_modules())
    for node in graph.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if node.op == "call_module" and not (
                (isinstance(module, nn.Conv2d) and module.padding_mode == "zeros")
                or (type(module) is nn.BatchNorm2d and not module.training and module.track_running_stats)
                or isinstance(module, (nn.ReLU, nn.Identity))):
            return None
        if node.op == "call_function" and node.target not in _SIDE_BY_SIDE_FUNCTIONS:
            return None
        if node.op in ("call_method", "get_attr"):
            return None

    def flat(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.reshape(-1, *tensor.shape[2:])

    class SideBySide(fx.Interpreter):
        def __init__(self, params: dict, buffers: dict) -> None:
            super().__init__(graph)
            self.params, self.buffers = params, buffers

        def call_module(self, target, args, kwargs):
            module, p, b = modules[target], self.params, self.buffers
            if isinstance(module, nn.Conv2d):
                return F.conv2d(args[0], flat(p[f"{target}.weight"]), flat(p.get(f"{target}.bias")), module.stride,
                                module.padding, module.dilation, module.groups * models)
            if isinstance(module, nn.BatchNorm2d):
                return F.batch_norm(args[0], flat(b[f"{target}.running_mean"]), flat(b[f"{target}.running_var"]),
                                    flat(p.get(f"{target}.weight")), flat(p.get(f"{target}.bias")), False, 0.0,
                                    module.eps)
            return super().call_module(target, args, kwargs)  # ReLU, Identity

    def run(params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return SideBySide(params, buffers).run(x)
    return run


def moments_pay(template: nn.Module, input_shape: torch.Size) -> bool:
    """Whether a step takes its gradient from per-example moments (``moments.MomentGradient``): the
    unit is affine in its weight and its moments are small against a convolution step's work. Read
    off the shapes alone, so no machine takes another way (their float rounding differs); memory
    only splits the models into groups whose moments fit (``learn_rounding``)."""
    affine = AffineUnit.of(template)
    return affine is not None and affine.worth_it(input_shape)


def choose_way(template: nn.Module, models: int, device: torch.device, input_shape: torch.Size | None = None) -> str:
    """How ``learn_rounding`` runs a unit's models by default: from moments where ``moments_pay`` says
    so for inputs of ``input_shape`` (per example), else one_by_one, else grouped, else vmap."""
    if input_shape is not None and moments_pay(template, input_shape):
        return "moments"
    if runs_per_model(template, device):
        return "one_by_one"
    return "grouped" if grouped_forward(template, models) else "vmap"


def models_per_table(affine: AffineUnit, examples: int, device: torch.device) -> int:
    """How many models' moments one table holds: as many as fit the memory share a training group may
    take, at least one. Each model's steps compute the same bits in a group of any size (Adam and the
    gradient's products act model by model), so this changes no result."""
    return max(1, int(memory_share(device) // max(affine.table_bytes(examples, 1), 1)))


def one_by_one(function):
    """What ``torch.vmap(function)`` computes on (batch, models, ...), computed one model after another:
    the same per-model ops as alone."""
    def run(params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([function({k: v[m] for k, v in params.items()}, {k: v[m] for k, v in buffers.items()},
                                     x[:, m]) for m in range(x.shape[1])], dim=1)
    return run


def _rounding_layers(params: dict[str, torch.Tensor], weight_keys: list[str], levels: dict[str, int],
                     grids: list[dict[str, Grid]]) -> list[_Layer]:
    """One ``_Layer`` per weight key of the models' stacked ``params``, V starting at the weights."""
    layers = []
    for key in weight_keys:
        weight = params[key]
        rows = weight.reshape(weight.shape[0], weight.shape[1], -1)
        scale = torch.stack([g[key].scale for g in grids])
        zero = torch.stack([g[key].zero_point for g in grids])
        floor = torch.floor(rows / scale)
        v = initial_v(rows / scale - floor).clone().requires_grad_()
        layers.append(_Layer(key, weight.shape, floor, scale, zero, levels[key], v))
    return layers


def learn_rounding(units: list[nn.Module], weight_keys: list[str], levels: dict[str, int],
                   grids: list[dict[str, Grid]], inputs: torch.Tensor, targets: torch.Tensor,
                   schedule: RoundingSchedule, way: str | None = None,
                   ) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """Hard-rounded weights per model and key, for ``units`` (one per model) reconstructing ``targets``,
    and per model the fraction of soft choices that ended decided (within 0.01 of 0 or 1).

    inputs (n, M, ...) and targets (n, M, ...) hold, example by example, each model's captured unit
    inputs (from its partly quantized self) and full-precision outputs side by side: a step gathers
    its batch along the first axis, and every way below reads that layout without copying it.
    Inside each step the models run as grouped convolutions ("grouped", ``grouped_forward``),
    vmapped ("vmap") or one by one ("one_by_one", ``runs_per_model``), or a unit affine in its weight
    takes its gradient from per-example moments ("moments", ``moments.MomentGradient``); ``way``
    forces one, by default ``choose_way`` picks.
    """
    template = units[0]
    models = len(units)
    way = way or choose_way(template, models, inputs.device, inputs.shape[2:])
    if way == "moments":
        affine = AffineUnit.of(template)
        if affine is None or weight_keys != ["0.weight"]:
            raise ValueError(f"a {type(template).__name__} unit is not one layer affine in its weight")
        group = models_per_table(affine, inputs.shape[0], inputs.device)
        if group < models:  # before anything is stacked: each group stacks its own
            parts = [learn_rounding(units[s:s + group], weight_keys, levels, grids[s:s + group], inputs[:, s:s + group],
                                    targets[:, s:s + group], schedule, way) for s in range(0, models, group)]
            return [w for part in parts for w in part[0]], [d for part in parts for d in part[1]]
    params, buffers = stack_module_state(units)
    params = {k: p.detach() for k, p in params.items()}
    layers = _rounding_layers(params, weight_keys, levels, grids)

    def forward(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(template, {**p, **b}, (x,))

    moment_gradient = None
    if way == "moments":
        moment_gradient = MomentGradient(affine, params, buffers, inputs, targets)
    elif way == "grouped":
        grouped = grouped_forward(template, models)
        if grouped is None:
            raise ValueError(f"a {type(template).__name__} unit cannot run as grouped convolutions")

        def batched(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
            return grouped(p, b, x.flatten(1, 2)).unflatten(1, (models, -1))
    elif way in ("one_by_one", "vmap"):
        batched = {"one_by_one": one_by_one(forward), "vmap": torch.vmap(forward, in_dims=(0, 0, 1), out_dims=1)}[way]
    else:
        raise ValueError(f"unknown way {way!r}")
    optimizer = torch.optim.Adam([layer.v for layer in layers], lr=schedule.lr, fused=True)
    generator = torch.Generator().manual_seed(schedule.seed)
    model_channels = models * targets.shape[2]
    for step in range(schedule.iters):
        index = torch.randperm(inputs.shape[0], generator=generator)[: schedule.batch_size].to(inputs.device)
        soft = {layer.key: layer.soft_weights() for layer in layers}
        if moment_gradient is not None:
            grads = {"0.weight": moment_gradient(soft["0.weight"].detach(), index)}
        else:
            output = batched({**params, **soft}, buffers, inputs.index_select(0, index))
            output.backward(reconstruction_gradient(output.detach(), targets.index_select(0, index), model_channels))
            grads = {key: torch.zeros_like(w) if w.grad is None else w.grad for key, w in soft.items()}
        beta = beta_at(step, schedule) if step >= schedule.warmup * schedule.iters else None
        for layer in layers:
            layer.set_gradient(grads[layer.key], schedule.reg_weight, beta)
        optimizer.step()

    with torch.no_grad():
        hard = {layer.key: layer.weights((layer.v >= 0).to(layer.v.dtype)) for layer in layers}
        decided = torch.stack([_decided(layer.v) for layer in layers]).sum(0)
        total = sum(layer.v[0].numel() for layer in layers)
    weights = [{key: value[m] for key, value in hard.items()} for m in range(models)]
    return weights, [float(d) / total for d in decided]


def _decided(v: torch.Tensor, margin: float = 0.01) -> torch.Tensor:
    """Per model, how many soft choices lie within ``margin`` of 0 or 1."""
    h = soft_choice(v)
    return ((h <= margin) | (h >= 1 - margin)).flatten(1).sum(1)


def autograd_learn_rounding(units: list[nn.Module], weight_keys: list[str], levels: dict[str, int],
                            grids: list[dict[str, Grid]], inputs: torch.Tensor, targets: torch.Tensor,
                            schedule: RoundingSchedule, way: str | None = None,
                            ) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """``learn_rounding`` for one model, its step as the study's code writes it: the soft weights
    built from V inside autograd, the loss the per-channel-summed squared error plus the regulariser,
    ``backward`` and Adam. The reference the tests and ``benchmarks/ptq_speed.py`` hold it to."""
    (unit,) = units
    inputs, targets = inputs[:, 0], targets[:, 0]
    params, buffers = stack_module_state(units)
    state = {k: t[0].detach() for k, t in {**params, **buffers}.items()}
    layers = _rounding_layers({k: p.detach() for k, p in params.items()}, weight_keys, levels, grids)
    optimizer = torch.optim.Adam([layer.v for layer in layers], lr=schedule.lr)
    generator = torch.Generator().manual_seed(schedule.seed)
    for step in range(schedule.iters):
        index = torch.randperm(inputs.shape[0], generator=generator)[: schedule.batch_size]
        weights = {layer.key: layer.weights(soft_choice(layer.v))[0] for layer in layers}
        output = functional_call(unit, {**state, **weights}, (inputs[index],))
        loss = F.mse_loss(output, targets[index], reduction="none").sum(1).mean()
        if step >= schedule.warmup * schedule.iters:
            beta = beta_at(step, schedule)
            loss = loss + schedule.reg_weight * sum((1 - (2 * soft_choice(layer.v) - 1).abs().pow(beta)).sum()
                                                    for layer in layers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        decided = sum(int(_decided(layer.v)) for layer in layers) / sum(layer.v.numel() for layer in layers)
        return [{layer.key: layer.weights((layer.v >= 0).to(layer.v.dtype))[0] for layer in layers}], [decided]
