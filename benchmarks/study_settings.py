"""What each difference from the study's method settings changes, measured on a few targets of a task.

    python benchmarks/study_settings.py --task fashion-mnist-resnet --data-root DATA --targets 4 --plan w2 --save

For each (method, setting) row: the targets are quantized with the benchmark's default config
and with the study's value of one setting, and the row reports, summed or averaged over the
targets:
  * output error: mean squared difference of the logits from the full-precision model's, on the
    first 1,000 test images (what reconstruction tries to keep small);
  * test accuracy;
  * TPR at 0.1% FPR of online LiRA (oblivious: the other pool models, full precision, as
    shadows) and the true positives it rests on;
  * wall time of the quantization.
The pool comes from the cache (or is trained). --save writes the table under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import time
from pathlib import Path

import numpy as np
import torch

from mia_ptq_bench.atomic import write_text_atomic
from mia_ptq_bench.attack.lira import lira_online
from mia_ptq_bench.cache import default_cache_dir, in_use
from mia_ptq_bench.data import load_dataset
from mia_ptq_bench.inference import accuracy, score_split
from mia_ptq_bench.inference.predict import predict_logits
from mia_ptq_bench.metrics.roc import attack_metrics
from mia_ptq_bench.pool import build_pool
from mia_ptq_bench.quantize import QUANTIZERS
from mia_ptq_bench.quantize.calibration import calibration_set
from mia_ptq_bench.spec import PrecisionPlan, load_task

# (method, what differs, the study's value of it as config overrides); the first row of each
# method is the benchmark's default.
VARIANTS = [
    ("adaround", "default (2,000 steps, lr 1e-2, BN folded)", {}),
    ("adaround", "study steps (20,000, lr 1e-3)", {"iters": 20000, "lr": 1e-3}),
    ("adaround", "study BN (kept)", {"bn": "study"}),
    ("brecq", "default (2,000 steps, lr 1e-2, per-channel)", {}),
    ("brecq", "study scales (per-tensor)", {"per_channel": False}),
    ("obc", "default (BN folded)", {}),
    ("obc", "study BN (re-estimated)", {"bn": "study"}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="fashion-mnist-resnet")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--targets", type=int, default=4)
    parser.add_argument("--plan", default="w2")
    parser.add_argument("--only", default=None, help="comma-separated methods to run (default: all)")
    parser.add_argument("--skip", action="append", default=[],
                        help="leave out the settings whose label contains this text (repeatable), e.g. 'study steps'")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    spec = load_task(args.task)
    data = load_dataset(spec.dataset, args.data_root)
    with in_use(default_cache_dir(), [spec.id]):  # a `cache clear` is refused while the pool is read
        pool = build_pool(spec, data, default_cache_dir())
        plan = PrecisionPlan.parse(args.plan)
        targets = list(range(args.targets))
        probe = type(data.test)(data.test.images[:1000], data.test.labels[:1000])
        reference = {t: predict_logits(pool.load_model(t), data, probe) for t in targets}
        lines = [f"# {spec.id} v{spec.version}, plan {plan}, targets {targets}; "
                 f"{datetime.date.today()}, {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
                 f"# fp32: test accuracy {100 * np.mean([pool.test_accuracy[t] for t in targets]):.2f}%",
                 f"{'method':9} {'setting':44} {'output MSE':>10} {'test acc':>9} {'TPR@0.1%':>9} {'TP':>5} {'seconds':>8}"]
        print("\n".join(lines), flush=True)
        for method, label, overrides in VARIANTS:
            if (args.only and method not in args.only.split(",")) or any(text in label for text in args.skip):
                continue
            quantizer = QUANTIZERS.get(method)(overrides)
            cals = [calibration_set(spec, data, pool.keep, t, quantizer.calibration_size(spec.calibration.size), "cpu")
                    for t in targets]
            start = time.perf_counter()
            models = quantizer.quantize_many([copy.deepcopy(pool.load_model(t)) for t in targets], cals, plan)
            seconds = time.perf_counter() - start
            errors, accuracies, true_positives, positives = [], [], 0, 0
            for t, model in zip(targets, models):
                errors.append(float((predict_logits(model, data, probe) - reference[t]).square().mean()))
                accuracies.append(accuracy(model, data, data.test))
                others = [m for m in range(spec.membership.n_models) if m != t]
                scores = lira_online(pool.scores[others], pool.keep[others], score_split(model, data, data.pool, spec.queries))
                low = attack_metrics(pool.keep[t], scores).low_fpr[0]
                true_positives, positives = true_positives + low.true_positives, positives + low.positives
            line = (f"{method:9} {label:44} {np.mean(errors):10.4f} {100 * np.mean(accuracies):8.2f}% "
                    f"{100 * true_positives / positives:8.3f}% {true_positives:5d} {seconds:8.1f}")
            print(line, flush=True)
            lines.append(line)
        if args.save:
            path = Path(__file__).parent / "results" / f"study_settings-{spec.id}-{args.plan}.txt"
            lines.insert(1, f"# left out: {', '.join(args.skip)}" if args.skip else "# every setting")
            write_text_atomic(path, "\n".join(lines) + "\n")
            print(f"saved {path}")


if __name__ == "__main__":
    main()
