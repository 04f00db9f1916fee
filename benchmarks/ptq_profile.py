"""Where quantization time goes on a task's architecture: per reconstruction unit, and inside GPTQ/OBC.

    python benchmarks/ptq_profile.py --task fashion-mnist-resnet --data-root DATA --save

Timing hardly depends on what the weights learned, so the models here are the pool's freshly
initialised ones (no pool to train), calibrated on their own members as ``evaluate`` does;
``benchmarks/ptq_speed.py`` measures speed and reconstruction error on trained models. Prints:
- per AdaRound (layer) and BRECQ (block) unit: milliseconds per model per optimisation step with
  ``--models`` models vmapped together and with the same models looped one by one inside each
  step (each convolution run per model instead of as one grouped convolution), so a reader sees
  which units batching helps and which it slows (``rounding.runs_per_model`` picks per unit);
- for GPTQ and OBC on ``--second-order-models`` models: seconds per model, and the share spent accumulating
  the layer Hessians (float64, in ``obs.HessianAccumulator.add``) against the rest (grids, sweeps,
  forward passes).
--save writes the output under benchmarks/results/ with the machine's description.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe, idle_fraction, load_average, save, say, wait_for_quiet  # noqa: E402

from mia_ptq_bench.allocator import keep_freed_memory  # noqa: E402
from mia_ptq_bench.data import load_dataset  # noqa: E402
from mia_ptq_bench.pool import pool_keep_masks  # noqa: E402
from mia_ptq_bench.pool.train import init_model  # noqa: E402
from mia_ptq_bench.quantize import QUANTIZERS  # noqa: E402
from mia_ptq_bench.quantize.calibration import calibration_set  # noqa: E402
from mia_ptq_bench.quantize.common import GridConfig  # noqa: E402
from mia_ptq_bench.quantize.obs import HessianAccumulator  # noqa: E402
from mia_ptq_bench.quantize.rounding import RoundingSchedule, learn_rounding  # noqa: E402
from mia_ptq_bench.quantize.units import block_units, capture, layer_units  # noqa: E402
from mia_ptq_bench.spec import PrecisionPlan, load_task  # noqa: E402

def unit_step_ms(units_per_model, u: int, models, images, steps: int, looped: bool) -> float:
    first = [units[u] for units in units_per_model]
    inputs = torch.stack([capture(m, unit.first, images, "input") for m, unit in zip(models, first)])
    targets = torch.stack([capture(m, unit.last, images, "output") for m, unit in zip(models, first)])
    keys = [f"{prefix}.weight" for prefix in first[0].layers]
    grids = [{f"{p}.weight": GridConfig().grid(m.get_submodule(layer).weight.detach(), 4)
              for p, layer in unit.layers.items()} for m, unit in zip(models, first)]
    schedule = RoundingSchedule(steps, 32, 1e-2, 0.001, 20.0, 2.0, 0.2, 0)
    with torch.enable_grad():
        start = time.perf_counter()
        learn_rounding([unit.module for unit in first], keys, {k: 4 for k in keys}, grids, inputs, targets, schedule,
                       way="one_by_one" if looped else "vmap")
        return (time.perf_counter() - start) / steps / len(models) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="fashion-mnist-resnet")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--models", type=int, default=16)
    parser.add_argument("--second-order-models", type=int, default=4, help="models quantized by GPTQ and OBC")
    parser.add_argument("--steps", type=int, default=40, help="optimisation steps timed per unit")
    parser.add_argument("--plan", default="w2")
    parser.add_argument("--patience", type=float, default=120)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    kept = keep_freed_memory()
    spec = load_task(args.task)
    data = load_dataset(spec.dataset, args.data_root)
    keep = pool_keep_masks(spec, len(data.pool))
    started = datetime.datetime.now()
    say(f"# PTQ profile · {started:%Y-%m-%d %H:%M} · task {spec.id} ({spec.model.arch} x{spec.model.width:g}), "
        f"{args.models} freshly initialised pool models, calibrated on their members")
    say(f"{describe()} · allocator {'keeps freed memory' if kept else 'default'}")
    say(f"load average at start: {load_average()} · idle share now {idle_fraction():.2f}")
    models = [init_model(spec, data, i).eval() for i in range(args.models)]
    images = calibration_set(spec, data, keep, 0, 256, "cpu").images

    for method, split in (("adaround", layer_units), ("brecq", block_units)):
        say()
        say(f"{method}: ms per model per step, {args.models} models, batch 32, {args.steps} steps per unit")
        say(f"{'unit':28} {'input':14} {'vmapped':>8} {'looped':>8} {'looped/vmapped':>15}")
        units_per_model = [split(m) for m in models]
        totals = [0.0, 0.0]
        for u, unit in enumerate(units_per_model[0]):
            wait_for_quiet(args.patience)
            times = [unit_step_ms(units_per_model, u, models, images, args.steps, looped) for looped in (False, True)]
            totals = [t + x for t, x in zip(totals, times)]
            first_input = capture(models[0], unit.first, images[:1], "input")
            say(f"{unit.name:28} {'x'.join(map(str, first_input.shape[1:])):14} {times[0]:8.3f} {times[1]:8.3f} "
                f"{times[1] / times[0]:15.2f}")
        say(f"{'all units':28} {'':14} {totals[0]:8.3f} {totals[1]:8.3f} {totals[1] / totals[0]:15.2f}")

    say()
    count = args.second_order_models
    say(f"second-order methods at {args.plan}, {count} models quantized together, their default calibration")
    plan = PrecisionPlan.parse(args.plan)
    for method in ("gptq", "obc"):
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
    say(f"load average at the end: {load_average()}")
    if args.save:
        save(f"ptq_profile-{spec.id}-{started:%Y%m%d-%H%M}.txt")


if __name__ == "__main__":
    main()
