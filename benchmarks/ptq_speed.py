"""PTQ speed on a task's own models: each method as the benchmark runs it against a plain run of the same algorithm.

    python benchmarks/ptq_speed.py --task fashion-mnist-resnet --data-root DATA --save

Trains ``--models`` pool models with the task's recipe (or loads them from a complete pool in
``--cache-dir``), then for every method and plan times
- ours: what `mptq-bench evaluate` runs: ``quantize_many`` on the whole group (AdaRound/BRECQ:
  one optimisation for all models, the units' inputs and targets from forward passes carried from
  unit to unit; OBC: the rows of every model in one sweep, 32 at a time, arrays
  shrunk as columns are fixed, in-place downdates; GPTQ: lazy 128-column blocks; every method:
  each layer's grid search run once over the rows of all models, BatchNorm pairs traced once);
- plain: the same algorithm written straightforwardly, on ``--plain-models`` of the models
  (AdaRound/BRECQ: one model at a time, each step autograd through the soft weights with the
  regulariser a term of the loss, and each unit's inputs and targets from a forward pass of the
  calibration images stopped at the unit, as the study's code does; OBC: one row at a time on full-size
  arrays; GPTQ: its own lazy 128-column blocks, as its reference code runs it, one model at a time; OBC and GPTQ: each
  convolution's Hessian from its whole im2col matrix in one product, as the reference codes do
  (ours takes one batched product per band of pixel displacements, ``quantize/gram.py``); RTN, and the grids
  and BatchNorm folding of every method: the same code given one model at a time).
Ours quantizes every plan of ``--plans`` with one quantizer object, as `evaluate` runs a grid (so
OBC computes each model's full-precision Hessians once, for all plans, and every method replays the
leading units an earlier plan quantized at the same levels: w1.58-last8 redoes only the classifier
after w1.58, ``quantize/memo.py``); plain starts a fresh
quantizer per plan, as the study runs one process per bit width. With several plans a last row
per method gives the whole grid's ratio (``--plans w4,w2,w1.58,w1.58-last8`` is the task's grid).
It prints models per minute, the ratio, and the reconstruction error of both (mean squared
error of the logits against the full-precision model, BatchNorm folded, on test images) with
the test accuracy; a row whose two errors differ by more than 0.1% is marked: its ratio is not one at
equal error. AdaRound and BRECQ draw their calibration batches at random, so the exact float path
decides their error too: for a method with a ``seed``, plain runs again with each of the next
``--seed-spread`` seeds (1 by default, 0 for none; not timed) and the row shows those plain-vs-plain
differences; a difference between ours and plain no larger than the largest of them is called equal
error, since the method's own result moves that much with nothing but its batch order changed. (One
reseeded run of 4 models is a weak yardstick for BRECQ: its largest spread seen is 11%, and which
plan looked unequal changed from machine to machine; more seeds measure it better, and more models:
each row also counts on how many models, one by one, each run's error is below plain's.) For AdaRound and BRECQ plain
also runs once more with only its Adam switched to the fused implementation ours uses (``--float-spread``, on by
default; not timed): the same algorithm in another float order, which alone moves BRECQ's error by
several per cent; the larger of the two plain-vs-plain differences is the yardstick. Both run in this process,
one after the other per method (``--rounds`` times, interleaved, the best time counting), after
an idle-CPU wait;
--save writes the output under benchmarks/results/ with the machine's description.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import pickle
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe, idle_fraction, load_average, save, say, wait_for_quiet  # noqa: E402

from mia_ptq_bench.allocator import keep_freed_memory  # noqa: E402
from mia_ptq_bench.cache import in_use  # noqa: E402
from mia_ptq_bench.cli import make_quantizer  # noqa: E402
from mia_ptq_bench.context import worker_threads  # noqa: E402
from mia_ptq_bench.data import load_dataset  # noqa: E402
from mia_ptq_bench.executor import ResidentProcesses  # noqa: E402
from mia_ptq_bench.inference import accuracy  # noqa: E402
from mia_ptq_bench.pool import PoolStore, build_pool, pool_keep_masks  # noqa: E402
from mia_ptq_bench.pool.train import Speed, init_model, make_schedule, train_stacked  # noqa: E402
from mia_ptq_bench.quantize import QUANTIZERS  # noqa: E402
from mia_ptq_bench.quantize.calibration import calibration_set  # noqa: E402
from mia_ptq_bench.quantize.gram import im2col_gram  # noqa: E402
from mia_ptq_bench.quantize.obs import obc_quantize  # noqa: E402
from mia_ptq_bench.quantize.rounding import autograd_learn_rounding  # noqa: E402
from mia_ptq_bench.runner import quantize_groups  # noqa: E402
from mia_ptq_bench.quantize.second_order import OBC  # noqa: E402
from mia_ptq_bench.spec import PrecisionPlan, load_task  # noqa: E402

class PlainOBC(OBC):
    """The same sweep one row at a time, on full-size arrays throughout."""

    def sweep(self, weight, hessian, grid):
        return obc_quantize(weight, hessian, grid, parallel=1, rel_damp=self.config.rel_damp,
                            fallback_damp=self.config.fallback_damp, compact=1.0)

    def sweep_many(self, weights, hessians, grids):
        return [self.sweep(w, h, g) for w, h, g in zip(weights, hessians, grids)]


EQUAL_ERROR = 1e-3  # relative difference of the two reconstruction errors still called equal


def plain_hessians(cls):
    """GPTQ or OBC with each layer's Hessian from the whole im2col matrix in one product."""
    class Plain(cls):
        def quantize_prepared(self, *args, **kwargs):
            with mock.patch("mia_ptq_bench.quantize.obs.input_gram", im2col_gram):
                return super().quantize_prepared(*args, **kwargs)
    return Plain


def plain_reconstruction(cls):
    """AdaRound or BRECQ with ``rounding.autograd_learn_rounding`` in place of the batched optimisation,
    and each unit's inputs and targets captured by a pass from the images that stops at the unit."""
    class Plain(cls):
        def quantize_prepared(self, *args, **kwargs):
            with (mock.patch("mia_ptq_bench.quantize.reconstruction.learn_rounding", autograd_learn_rounding),
                  mock.patch("mia_ptq_bench.quantize.reconstruction.forward_plan", return_value=None)):
                return super().quantize_prepared(*args, **kwargs)
    return Plain


def pool_models(spec, data, count: int, cache_dir: Path | None, device: torch.device) -> list[torch.nn.Module]:
    if cache_dir is not None and PoolStore(cache_dir, spec).is_complete_pool():
        with in_use(cache_dir, [spec.id], create=False):  # a `cache clear` is refused while the pool is read
            pool = build_pool(spec, data, cache_dir, device)
            return [pool.load_model(i, device) for i in range(count)]
    keep = pool_keep_masks(spec, len(data.pool))
    schedules = [make_schedule(spec, np.flatnonzero(keep[i]), len(data.pool), i) for i in range(count)]
    return train_stacked(spec, data.to(device), [init_model(spec, data, i) for i in range(count)], schedules,
                         device, Speed.for_device(device))


# What a worker process of the "ours in processes" run holds: the models and their calibration sets, handed
# once when it starts, and the quantizer it goes on with from plan to plan (its memo included).
_HELD: dict = {}


def _receive(handed: bytes) -> None:
    _HELD.clear()
    _HELD["models"], _HELD["calibrations"] = pickle.loads(handed)


def _quantize_share(job: tuple) -> list[torch.nn.Module]:
    """In a worker: quantize its share of the models at one plan with its own quantizer, as
    `evaluate`'s resident workers do (quantize/outputs.py quantize_unit); the first ``keep`` come back."""
    method, settings, text, share, threads, keep = job
    torch.set_num_threads(threads)
    if "quantizer" not in _HELD:
        _HELD["quantizer"] = make_quantizer(QUANTIZERS.get(method), settings)
    models = [copy.deepcopy(_HELD["models"][i]) for i in share]
    return _HELD["quantizer"].quantize_many(models, [_HELD["calibrations"][i] for i in share],
                                            PrecisionPlan.parse(text))[:keep]


def lower_count(errors: np.ndarray, plain: np.ndarray) -> str:
    """On how many models one run's error is below plain's: a paired view that a mean over few models hides."""
    return f"{int((errors < plain).sum())}/{len(plain)} models"


def logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.eval()(batch) for batch in images.split(500)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="fashion-mnist-resnet")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--cache-dir", type=Path, default=None, help="use this cache's pool when it is complete")
    parser.add_argument("--models", type=int, default=16, help="models quantized together (evaluate: 16 per group)")
    parser.add_argument("--plain-models", type=int, default=2, help="of those, quantized by the plain runs")
    parser.add_argument("--plans", default="w2")
    parser.add_argument("--methods", default="adaround,brecq,obc,gptq")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="config override for both runs of a method, e.g. adaround.iters=500")
    parser.add_argument("--rounds", type=int, default=1, help="repetitions of both runs, interleaved; the best counts")
    parser.add_argument("--seed-spread", type=int, default=1, metavar="N",
                        help="for a method with a seed, run plain again with each of the next N seeds (untimed) to "
                             "show how far its error moves with the batch order alone (0: none)")
    parser.add_argument("--float-spread", action=argparse.BooleanOptionalAction, default=True,
                        help="for AdaRound and BRECQ, run plain once more with only its Adam fused, as ours runs it "
                             "(untimed): how far its error moves with the float order alone")
    parser.add_argument("--workers", type=int, default=2,
                        help="also time ours with the models shared out among this many processes of "
                             "threads/workers threads each, as evaluate runs a long grid on a CPU (1: not)")
    parser.add_argument("--patience", type=float, default=300)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    if args.seed_spread < 0:
        parser.error("--seed-spread: a number of seeds, 0 or more")
    if args.workers < 1 or (args.workers > 1 and args.plain_models > -(-args.models // args.workers)):
        parser.error("--workers: 1 or more, with --plain-models no more than the first worker's share of --models")
    device = torch.device(args.device)
    kept = keep_freed_memory()
    spec = load_task(args.task)
    data = load_dataset(spec.dataset, args.data_root)
    keep = pool_keep_masks(spec, len(data.pool))
    started = datetime.datetime.now()
    say(f"# PTQ speed benchmark · {started:%Y-%m-%d %H:%M} · task {spec.id} (pool hash {spec.pool_hash[:12]})")
    say(f"{describe(device)} · allocator "
        f"{'keeps freed memory' if kept else 'default'} (for both runs)")
    say(f"load average at start: {load_average()} · idle share now {idle_fraction():.2f}")

    start = time.perf_counter()
    models = pool_models(spec, data, args.models, args.cache_dir, device)
    test = data.test
    test_images = data.normalize(test.images[:1000]).to(device)
    say(f"{args.models} {spec.model.arch} x{spec.model.width:g} pool models ready in {time.perf_counter() - start:.0f} s; "
        f"plain runs on the first {args.plain_models}; test accuracy at fp32 "
        f"{100 * np.mean([accuracy(m, data, test, device) for m in models[:args.plain_models]]):.2f}%")
    overrides: dict[str, list[str]] = {}
    for item in args.set:
        method, _, setting = item.partition(".")
        overrides.setdefault(method, []).append(setting)
    say(f"config overrides: {overrides or 'none (the defaults evaluate uses)'} · "
        f"{args.rounds} round(s) of both runs, the best time of each side counts")
    say()
    n = args.plain_models
    workers = args.workers if device.type == "cpu" else 1
    procs_label = f"x{workers}"
    if workers > 1:
        say(f"ours {procs_label}: ours with the models shared out among {workers} worker processes of "
            f"{worker_threads(workers)} thread(s), each keeping its quantizer from plan to plan (the processes are "
            f"started and handed the models before the clock); ratio {procs_label} = plain / ours {procs_label}")
    procs = f"x{workers}" if workers > 1 else ""
    say(f"{'method':9} {'plan':12} {'ours models/min':>15} "
        + (f"{'ours ' + procs + ' m/min':>15} " if procs else "")
        + f"{'plain models/min':>16} {'ratio':>6} " + (f"{'ratio ' + procs:>9} " if procs else "")
        + f"{'MSE ours':>9} {'MSE plain':>9} {'acc ours':>8} {'acc plain':>9}")
    plain_classes = {"obc": plain_hessians(PlainOBC), "gptq": plain_hessians(QUANTIZERS.get("gptq")),
                     "adaround": plain_reconstruction(QUANTIZERS.get("adaround")),
                     "brecq": plain_reconstruction(QUANTIZERS.get("brecq"))}

    def calibrations(count: int, size: int):
        return [calibration_set(spec, data, keep, i, size, device) for i in range(count)]

    # The reference for the reconstruction error: each full-precision model with BatchNorm folded.
    folded = [QUANTIZERS.get("rtn")().quantize(copy.deepcopy(m), c, PrecisionPlan.parse("w16"))
              for m, c in zip(models[:n], calibrations(n, 8))]
    reference = [logits(f, test_images) for f in folded]
    texts = args.plans.split(",")
    plans = {text: PrecisionPlan.parse(text) for text in texts}
    for method in args.methods.split(","):
        cls = QUANTIZERS.get(method)
        settings = overrides.get(method, [])
        # Ours: one quantizer for every plan, as `evaluate` runs a grid (OBC keeps each model's
        # full-precision Hessians for the next plans; every method replays the units a plan shares
        # with an earlier one). Plain: a fresh quantizer per plan, as the
        # study runs one process per bit width, so nothing carries over from plan to plan.
        ours_s: dict[str, float] = {}
        procs_s: dict[str, float] = {}
        plain_s: dict[str, float] = {}
        ours, plain, in_procs = {}, {}, {}
        for _ in range(args.rounds):  # interleaved; each side keeps its best round
            ours_q = make_quantizer(cls, settings)  # a new one per round: nothing cached from the last
            size = ours_q.calibration_size(spec.calibration.size)
            wait_for_quiet(args.patience)
            for text, plan in plans.items():
                cals = calibrations(args.models, size)
                t0 = time.perf_counter()
                ours[text] = ours_q.quantize_many([copy.deepcopy(m) for m in models], cals, plan)[:n]
                ours_s[text] = min(ours_s.get(text, np.inf), (time.perf_counter() - t0) / args.models)
            if workers > 1:
                # As evaluate splits a plan's models among its workers (models 0..n-1, plain's, in the first share).
                shares = quantize_groups(list(range(args.models)), args.models, workers)
                handed = pickle.dumps(([m.cpu() for m in models], calibrations(args.models, size)))
                with ResidentProcesses(workers, functools.partial(_receive, handed)) as processes:
                    processes.map(len, [[]] * workers)  # started and handed the models, off the clock
                    wait_for_quiet(args.patience)
                    for text in plans:
                        jobs = [(method, settings, text, share, worker_threads(workers), n if w == 0 else 0)
                                for w, share in enumerate(shares)]
                        t0 = time.perf_counter()
                        in_procs[text] = processes.map(_quantize_share, jobs)[0]
                        procs_s[text] = min(procs_s.get(text, np.inf), (time.perf_counter() - t0) / args.models)
            wait_for_quiet(args.patience)
            for text, plan in plans.items():
                plain_q = make_quantizer(plain_classes.get(method, cls), settings)
                cals = calibrations(n, size)
                t0 = time.perf_counter()
                plain[text] = [plain_q.quantize(copy.deepcopy(m), c, plan) for m, c in zip(models, cals)]
                plain_s[text] = min(plain_s.get(text, np.inf), (time.perf_counter() - t0) / n)
        # Plain once more with one thing changed that leaves the algorithm as it is: how far its error
        # moves by chance. The batch order (the next seed), and for the methods that learn their
        # rounding with Adam the float order of Adam's update (fused, as ours runs it).
        changes: dict[str, tuple[list[str], object]] = {}
        if "seed" in cls.Config.model_fields:
            for step in range(1, args.seed_spread + 1):
                label = "next seed" if args.seed_spread == 1 else f"seed +{step}"
                changes[label] = ([f"seed={ours_q.config.seed + step}"], contextlib.nullcontext())
        if args.float_spread and method in ("adaround", "brecq"):
            changes["fused Adam"] = ([], mock.patch("torch.optim.Adam", functools.partial(torch.optim.Adam, fused=True)))
        variants: dict[str, dict[str, list]] = {}
        for label, (extra, context) in changes.items():
            with context:
                variants[label] = {text: [make_quantizer(plain_classes.get(method, cls), [*settings, *extra])
                                          .quantize(copy.deepcopy(m), c, plan)
                                          for m, c in zip(models, calibrations(n, size))]
                                   for text, plan in plans.items()}
        any_unequal = False
        for text in texts:
            groups = [ours[text], plain[text], *(v[text] for v in variants.values())]
            if workers > 1:  # the same method in other processes with other threads: its own error, shown
                procs_mse = float(np.mean([float((logits(q, test_images) - r).square().mean())
                                           for q, r in zip(in_procs[text], reference)]))
            per_model = [np.array([float((logits(q, test_images) - r).square().mean()) for q, r in zip(group, reference)])
                         for group in groups]
            mse = [float(errors.mean()) for errors in per_model]
            acc = [100 * float(np.mean([accuracy(q, data, test, device) for q in group])) for group in groups[:2]]
            chance = max((abs(other - mse[1]) for other in mse[2:]), default=0.0)
            unequal = abs(mse[0] - mse[1]) > max(EQUAL_ERROR * mse[1], chance)
            any_unequal |= unequal
            spread = "; ".join(f"{label} {value:.4f} ({100 * (value / mse[1] - 1):+.2f}%)"
                               for label, value in zip(variants, mse[2:]))
            procs_unequal = workers > 1 and abs(procs_mse - mse[1]) > max(EQUAL_ERROR * mse[1], chance)
            any_unequal |= procs_unequal
            say(f"{method:9} {text:12} {60 / ours_s[text]:15.2f} "
                + (f"{60 / procs_s[text]:15.2f} " if workers > 1 else "")
                + f"{60 / plain_s[text]:16.2f} {plain_s[text] / ours_s[text]:6.2f} "
                + (f"{plain_s[text] / procs_s[text]:9.2f} " if workers > 1 else "")
                + f"{mse[0]:9.4f} {mse[1]:9.4f} {acc[0]:7.2f}% {acc[1]:8.2f}%"
                + (f"  ours {procs} MSE {procs_mse:.4f}" + (" (differs: not at equal error)" if procs_unequal else "")
                   if workers > 1 else "")
                + (f"  plain again, MSE with {spread}; ours {100 * (mse[0] / mse[1] - 1):+.2f}%" if variants else "")
                + f"  lower than plain on: ours {lower_count(per_model[0], per_model[1])}"
                + "".join(f", {label} {lower_count(errors, per_model[1])}" for label, errors in zip(variants, per_model[2:]))
                + ("  (errors differ: not a ratio at equal error)" if unequal else ""))
        if len(texts) > 1:
            ours_total, plain_total = sum(ours_s.values()), sum(plain_s.values())
            procs_total = sum(procs_s.values()) if workers > 1 else 0.0
            say(f"{method:9} {'all plans':12} {60 * len(texts) / ours_total:15.2f} "
                + (f"{60 * len(texts) / procs_total:15.2f} " if workers > 1 else "")
                + f"{60 * len(texts) / plain_total:16.2f} {plain_total / ours_total:6.2f} "
                + (f"{plain_total / procs_total:9.2f} " if workers > 1 else "")
                + f"  (model-plans per minute over the {len(texts)} plans"
                + ("; errors differ in a plan above)" if any_unequal else ")"))
    say("(MSE and accuracy over the first plain-models models, of both; ratio = plain seconds per model / ours; "
        "'lower than plain on' counts the models, one by one, whose error is below plain's)")
    say(f"load average at the end: {load_average()}")
    if args.save:
        save(f"ptq_speed-{spec.id}-{started:%Y%m%d-%H%M}.txt")


if __name__ == "__main__":
    main()
