"""LiRA at full scale: N examples x 64 pool models x 2 queries, against a plain NaN-masked baseline.

    python benchmarks/lira_speed.py [--examples 100000] [--models 64] [--targets 10]

The baseline fits the per-example Gaussians with np.nanmedian/np.nanstd over a NaN-masked
copy (the obvious implementation); ours sorts once and reads the middle entries. Prints
seconds for all targets and both online and offline LiRA, the ratio, and the largest
difference between the two answers.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
from scipy.stats import norm

from mia_ptq_bench.attack import leave_one_out
from mia_ptq_bench.attack.lira import lira_offline, lira_online
from mia_ptq_bench.pool import balanced_keep_masks


def baseline_online(shadow, shadow_in, target):
    ins = np.where(shadow_in[..., None], shadow, np.nan)
    outs = np.where(~shadow_in[..., None], shadow, np.nan)
    ratio = (norm.logpdf(target, np.nanmedian(ins, 0), np.nanstd(ins, 0) + 1e-30)
             - norm.logpdf(target, np.nanmedian(outs, 0), np.nanstd(outs, 0) + 1e-30))
    return ratio.mean(-1)


def baseline_offline(shadow, shadow_in, target):
    outs = np.where(~shadow_in[..., None], shadow, np.nan)
    return norm.logcdf(target, np.nanmedian(outs, 0), np.nanstd(outs, 0) + 1e-30).mean(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--models", type=int, default=64)
    parser.add_argument("--targets", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    keep = balanced_keep_masks(args.models, args.examples, 0.5, 0)
    scores = rng.normal(size=(args.models, args.examples, 2)) + keep[..., None]
    print(f"{args.examples} examples x {args.models} models x 2 queries, {args.targets} targets · "
          f"{platform.processor() or platform.machine()} · numpy {np.__version__}")
    for name, ours, plain in (("online", lira_online, baseline_online), ("offline", lira_offline, baseline_offline)):
        timings, answers = {}, {}
        for label, fn in (("baseline", plain), ("ours", ours)):
            start = time.perf_counter()
            answers[label] = [fn(scores[leave_one_out(args.models, t)], keep[leave_one_out(args.models, t)], scores[t])
                              for t in range(args.targets)]
            timings[label] = time.perf_counter() - start
        drift = max(float(np.abs(a - b).max()) for a, b in zip(answers["ours"], answers["baseline"]))
        print(f"LiRA {name:8}: baseline {timings['baseline']:6.2f} s, ours {timings['ours']:6.2f} s, "
              f"ratio {timings['baseline'] / timings['ours']:.2f}, max difference {drift:.1e}")


if __name__ == "__main__":
    main()
