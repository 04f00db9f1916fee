"""Where quantization time goes on a task's architecture: per reconstruction unit, and inside GPTQ/OBC.

    python benchmarks/ptq_profile.py --task fashion-mnist-resnet --data-root DATA --save

Timing hardly depends on what the weights learned, so the models here are the pool's freshly
initialised ones (no pool to train), BatchNorm folded and calibrated on their own members as
``evaluate`` does by default;
``benchmarks/ptq_speed.py`` measures speed and reconstruction error on trained models. Prints:
- per AdaRound (layer) and BRECQ (block) unit: milliseconds per model per optimisation step for
  ``--models`` models run each way ``rounding.learn_rounding`` knows: vmapped, as grouped
  convolutions on activations kept side by side (``rounding.grouped_forward``, where the unit
  allows it), looped one by one inside each step, and from per-example moments
  (``moments.MomentGradient``, for a unit affine in its weight; building the moments counts once
  per ``--iters`` steps, as in a default run), and which way it picks by default (BRECQ never
  takes the moments);
- the same units against the limit: one model's step in FLOP as written (FlopCounterMode: its
  convolutions, direct with their zero-padding taps, and matrix products, forward and backward), the
  time that work takes at the measured fp32 GEMM rate ("floor"), the default way's share of that rate,
  and the plain step (``rounding.autograd_learn_rounding``, the study's step, one model, best of 3
  runs) with the speed-ups over it of the default way and of the floor: the floor's is the most an
  implementation doing that work at the GEMM rate could gain over plain on this machine;
- for GPTQ and OBC on ``--second-order-models`` models: seconds per model, and the share spent accumulating
  the layer Hessians (float64, in ``obs.HessianAccumulator.add``) against the rest (grids, sweeps,
  forward passes);
- per layer of the first model: milliseconds for the Gram matrix ``X X^T`` of its inputs (float64,
  the ``--calibration`` images as one batch) as the Hessians take it (``gram.input_gram``: a
  convolution from one batched product per band of displacements) and as one product of the whole
  im2col matrix (what the reference codes and ptq_speed's plain runs do), interleaved, best of
  ``--repeats``, with the ratio, and each way's rate against the measured float64 GEMM peak.
--save writes the output under benchmarks/results/ with the machine's description.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe, gemm_peak, idle_fraction, load_average, save, say, wait_for_quiet  # noqa: E402

from mia_ptq_bench.allocator import keep_freed_memory  # noqa: E402
from mia_ptq_bench.data import load_dataset  # noqa: E402
from mia_ptq_bench.models import quantizable_layers  # noqa: E402
from mia_ptq_bench.pool import pool_keep_masks  # noqa: E402
from mia_ptq_bench.pool.train import init_model  # noqa: E402
from mia_ptq_bench.quantize import QUANTIZERS  # noqa: E402
from mia_ptq_bench.quantize.calibration import calibration_set  # noqa: E402
from mia_ptq_bench.quantize.common import GridConfig  # noqa: E402
from mia_ptq_bench.quantize.gram import im2col_gram, input_gram  # noqa: E402
from mia_ptq_bench.quantize.obs import HessianAccumulator  # noqa: E402
from mia_ptq_bench.quantize.batchnorm import fold_batchnorm  # noqa: E402
from mia_ptq_bench.quantize.moments import AffineUnit, MomentGradient  # noqa: E402
from mia_ptq_bench.quantize.rounding import (RoundingSchedule, autograd_learn_rounding, choose_way,  # noqa: E402
                                             grouped_forward, learn_rounding)
from mia_ptq_bench.quantize.units import block_units, capture  # noqa: E402
from mia_ptq_bench.spec import PrecisionPlan, load_task  # noqa: E402

WAYS = ("vmap", "grouped", "one_by_one", "moments")


def unit_problem(units_per_model, u: int, models, images):
    """Unit ``u`` of every model, with its weight keys, 4-bit grids, captured inputs and targets."""
    first = [units[u] for units in units_per_model]
    inputs = torch.stack([capture(m, unit.first, images, "input") for m, unit in zip(models, first)], dim=1)
    targets = torch.stack([capture(m, unit.last, images, "output") for m, unit in zip(models, first)], dim=1)
    keys = [f"{prefix}.weight" for prefix in first[0].layers]
    grids = [{f"{p}.weight": GridConfig().grid(m.get_submodule(layer).weight.detach(), 4)
              for p, layer in unit.layers.items()} for m, unit in zip(models, first)]
    return first, keys, grids, inputs, targets


def schedule_of(steps: int) -> RoundingSchedule:
    return RoundingSchedule(steps, 32, 1e-2, 0.001, 20.0, 2.0, 0.2, 0)


def unit_step_ms(units_per_model, u: int, models, images, steps: int, way: str, iters: int) -> float:
    """Milliseconds per model per step; a way's set-up before its first step (the moments) counts
    once per ``iters`` steps, as in a default run."""
    first, keys, grids, inputs, targets = unit_problem(units_per_model, u, models, images)
    schedule = schedule_of(steps)
    setup = [0.0]
    build = MomentGradient.__init__

    def timed_build(self, *args, build=build):
        start = time.perf_counter()
        build(self, *args)
        setup[0] += time.perf_counter() - start

    with torch.enable_grad(), mock.patch.object(MomentGradient, "__init__", timed_build):
        start = time.perf_counter()
        learn_rounding([unit.module for unit in first], keys, {k: 4 for k in keys}, grids, inputs, targets, schedule,
                       way=way)
        total = time.perf_counter() - start
    return ((total - setup[0]) / steps + setup[0] / iters) / len(models) * 1e3


def plain_step(units_per_model, u: int, models, images, steps: int, rounds: int = 3) -> tuple[float, float]:
    """FLOP (convolutions and matrix products, FlopCounterMode) and milliseconds of one step of the
    plain per-model loop (``rounding.autograd_learn_rounding``, the study's step) on the first model's
    unit: the work of the step as written (every way skips the unit input's gradient, as plain does),
    and what the plain one takes for it. Counted on the plain step, not a grouped one: FlopCounterMode
    counts a grouped convolution's weight gradient once per group too many."""
    first, keys, grids, inputs, targets = unit_problem(units_per_model, u, models[:1], images)
    run = functools.partial(autograd_learn_rounding, [first[0].module], keys, {k: 4 for k in keys}, grids,
                            inputs, targets)
    with torch.enable_grad():
        with FlopCounterMode(display=False) as counter:
            run(schedule_of(1))  # the first step: before the warm-up ends, as 20% of all steps are
        run(schedule_of(2))  # untimed warm-up
        seconds = float("inf")
        for _ in range(rounds):  # plain's step time moves by a third from run to run: the best counts
            start = time.perf_counter()
            run(schedule_of(steps))
            seconds = min(seconds, time.perf_counter() - start)
    return counter.get_total_flops(), seconds / steps * 1e3


def distance_to_limit(units_per_model, models, images, args, peak: float, defaults: list[float]) -> None:
    """Per unit: the step's FLOP, its floor at the GEMM peak, the default way against it, and the plain
    per-model step: so a speed-up over plain reads against the most any implementation could reach."""
    say()
    say(f"  the same units against the limit: one model's step (batch 32) in MFLOP as written (direct "
        f"convolutions, zero-padding taps included, and matrix products), its floor in ms at the fp32 GEMM peak, "
        f"the default way above ({args.models} models, one run) as a share of the peak, the plain step alone "
        f"(study-style autograd, best of 3 runs of {args.steps} steps, no capture), and the speed-ups over plain "
        f"of the default way and of the floor (a way from moments does less work than the step as written, "
        f"and may pass the floor)")
    say(f"  {'unit':26} {'MFLOP':>8} {'floor':>8} {'default':>8} {'of peak':>8} {'plain':>8} "
        f"{'default/plain':>14} {'floor/plain':>12}")

    def row(name: str, flop: float, default: float, plain: float) -> None:
        floor = flop / peak * 1e3
        say(f"  {name:26} {flop / 1e6:8.1f} {floor:8.3f} {default:8.3f} {floor / default:8.0%} {plain:8.3f} "
            f"{plain / default:13.2f}x {plain / floor:11.2f}x")

    sums = [0.0, 0.0, 0.0]
    for u, unit in enumerate(units_per_model[0]):
        wait_for_quiet(args.patience)
        flop, plain = plain_step(units_per_model, u, models, images, args.steps)
        sums = [a + b for a, b in zip(sums, (flop, defaults[u], plain))]
        row(unit.name, flop, defaults[u], plain)
    row("all units", *sums)


def layer_grams(model: torch.nn.Module, images: torch.Tensor, repeats: int, patience: float) -> None:
    inputs = {}
    hooks = [layer.register_forward_hook(lambda module, args, out, name=name: inputs.__setitem__(name, args[0]))
             for name, layer in quantizable_layers(model)]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    say()
    wait_for_quiet(patience)
    peak = gemm_peak(torch.device("cpu"), dtype=torch.float64)
    say(f"layer Gram matrices X X^T, float64, {len(images)} images, ms (best of {repeats}, the two interleaved), "
        f"and each way's rate in GFLOP/s (its own products, FlopCounterMode) against the float64 GEMM peak "
        f"(2048x2048, best of 10): {peak / 1e9:.0f} GFLOP/s")
    say(f"{'layer':24} {'input':14} {'kernel':>8} {'stride':>6} {'ours':>8} {'im2col':>8} {'ratio':>6} "
        f"{'ours GF/s':>10} {'of peak':>8} {'im2col GF/s':>12} {'of peak':>8}")
    totals = [0.0, 0.0]
    work = [0.0, 0.0]
    for name, layer in quantizable_layers(model):
        x = inputs[name]
        ways = (lambda: input_gram(layer, x), lambda: im2col_gram(layer, x))
        flops = []
        for way in ways:
            with FlopCounterMode(display=False) as counter:
                way()
            flops.append(counter.get_total_flops())
        best = [float("inf")] * 2
        for _ in range(repeats):
            for w, way in enumerate(ways):
                start = time.perf_counter()
                way()
                best[w] = min(best[w], time.perf_counter() - start)
        totals = [t + b for t, b in zip(totals, best)]
        work = [t + f for t, f in zip(work, flops)]
        kernel = "x".join(map(str, layer.kernel_size)) if isinstance(layer, torch.nn.Conv2d) else "linear"
        stride = str(layer.stride[0]) if isinstance(layer, torch.nn.Conv2d) else "-"
        rates = [f / b for f, b in zip(flops, best)]
        say(f"{name:24} {'x'.join(map(str, x.shape[1:])):14} {kernel:>8} {stride:>6} {1e3 * best[0]:8.2f} "
            f"{1e3 * best[1]:8.2f} {best[1] / best[0]:6.2f} {rates[0] / 1e9:10.1f} {rates[0] / peak:8.0%} "
            f"{rates[1] / 1e9:12.1f} {rates[1] / peak:8.0%}")
    rates = [f / t for f, t in zip(work, totals)]
    say(f"{'all layers':24} {'':14} {'':>8} {'':>6} {1e3 * totals[0]:8.2f} {1e3 * totals[1]:8.2f} "
        f"{totals[1] / totals[0]:6.2f} {rates[0] / 1e9:10.1f} {rates[0] / peak:8.0%} {rates[1] / 1e9:12.1f} "
        f"{rates[1] / peak:8.0%}")
    say(f"the products: ours {work[0] / 1e9:.2f} GFLOP, im2col {work[1] / 1e9:.2f} ({work[1] / work[0]:.2f}x); "
        f"ours at the float64 peak would take {1e3 * work[0] / peak:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="fashion-mnist-resnet")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--models", type=int, default=16)
    parser.add_argument("--second-order-models", type=int, default=4, help="models quantized by GPTQ and OBC")
    parser.add_argument("--steps", type=int, default=40, help="optimisation steps timed per unit")
    parser.add_argument("--plan", default="w2")
    parser.add_argument("--calibration", type=int, default=256, help="calibration images per model")
    parser.add_argument("--iters", type=int, default=2000, help="steps per unit the moments' set-up is spread over")
    parser.add_argument("--skip-units", action="store_true", help="leave out the AdaRound and BRECQ units")
    parser.add_argument("--skip-second-order", action="store_true")
    parser.add_argument("--repeats", type=int, default=9, help="timings per layer Gram matrix, the best counts")
    parser.add_argument("--patience", type=float, default=120)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    kept = keep_freed_memory()
    spec = load_task(args.task)
    data = load_dataset(spec.dataset, args.data_root)
    keep = pool_keep_masks(spec, len(data.pool))
    started = datetime.datetime.now()
    say(f"# PTQ profile · {started:%Y-%m-%d %H:%M} · task {spec.id} ({spec.model.arch} x{spec.model.width:g}), "
        f"{args.models} freshly initialised pool models, calibrated on {args.calibration} of their members")
    say(f"{describe()} · allocator {'keeps freed memory' if kept else 'default'}")
    say(f"load average at start: {load_average()} · idle share now {idle_fraction():.2f}")
    models = [fold_batchnorm(init_model(spec, data, i).eval()) for i in range(args.models)]
    images = calibration_set(spec, data, keep, 0, args.calibration, "cpu").images

    if not args.skip_units:
        wait_for_quiet(args.patience)
        peak = gemm_peak(torch.device("cpu"))
        say(f"measured peak: fp32 GEMM 2048x2048, best of 10: {peak / 1e9:.0f} GFLOP/s")
    for method, split in () if args.skip_units else (("adaround", QUANTIZERS.get("adaround")().units),
                                                      ("brecq", block_units)):
        say()
        say(f"{method}: ms per model per step, {args.models} models, batch 32, {args.steps} steps per unit"
            + (f" (the moments' set-up counted once per {args.iters} steps)" if method == "adaround" else ""))
        say(f"{'unit':28} {'input':14} " + " ".join(f"{way:>10}" for way in WAYS) + f" {'default':>10}")
        units_per_model = [split(m) for m in models]
        totals = dict.fromkeys(WAYS + ("default",), 0.0)
        defaults: list[float] = []
        for u, unit in enumerate(units_per_model[0]):
            wait_for_quiet(args.patience)
            first_input = capture(models[0], unit.first, images[:1], "input")
            # BRECQ never takes moments (reconstruction.BRECQ.moments): its default is chosen without a shape
            chosen = choose_way(unit.module, args.models, torch.device("cpu"),
                                first_input.shape[1:] if method == "adaround" else None)
            possible = {"grouped": grouped_forward(unit.module, args.models) is not None,
                        "moments": AffineUnit.of(unit.module) is not None}
            times = {way: unit_step_ms(units_per_model, u, models, images, args.steps, way, args.iters) for way in WAYS
                     if possible.get(way, True)}
            times["default"] = times[chosen]
            defaults.append(times["default"])
            for way in totals:  # a unit that cannot run a way counts at its default in that column
                totals[way] += times.get(way, times["default"])
            cells = " ".join(f"{times[way]:10.3f}" if way in times else f"{'-':>10}" for way in WAYS)
            say(f"{unit.name:28} {'x'.join(map(str, first_input.shape[1:])):14} {cells} {chosen:>10}")
        say(f"{'all units':28} {'':14} " + " ".join(f"{totals[way]:10.3f}" for way in WAYS)
            + f" {totals['default']:10.3f}")
        distance_to_limit(units_per_model, models, images, args, peak, defaults)

    count = 0 if args.skip_second_order else args.second_order_models
    if count:
        say()
        say(f"second-order methods at {args.plan}, {count} models quantized together, their default calibration")
    plan = PrecisionPlan.parse(args.plan)
    for method in ("gptq", "obc") if count else ():
        quantizer = QUANTIZERS.get(method)()
        size = quantizer.calibration_size(spec.calibration.size)
        cals = [calibration_set(spec, data, keep, i, size, "cpu") for i in range(count)]
        spent = [0.0]
        add = HessianAccumulator.add

        def timed_add(self, inputs, add=add):
            start = time.perf_counter()
            add(self, inputs)
            spent[0] += time.perf_counter() - start

        wait_for_quiet(args.patience)
        with mock.patch.object(HessianAccumulator, "add", timed_add):
            start = time.perf_counter()
            quantizer.quantize_many([copy.deepcopy(m) for m in models[:count]], cals, plan)
            total = time.perf_counter() - start
        say(f"{method:5} {total / count:7.2f} s per model · Hessians (float64) {100 * spent[0] / total:5.1f}% · "
            f"the rest {100 * (1 - spent[0] / total):5.1f}%")
    layer_grams(models[0], images, args.repeats, args.patience)
    say(f"load average at the end: {load_average()}")
    if args.save:
        save(f"ptq_profile-{spec.id}-{started:%Y%m%d-%H%M}.txt")


if __name__ == "__main__":
    main()
