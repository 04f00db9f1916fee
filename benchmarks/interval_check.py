"""Do the 95% intervals over targets hold, although the targets share one pool of shadows?

Every target of a task is attacked with the same pool's other models as shadows, so the
per-target values the Student-t interval is computed from are not independent. This trains R
independent pools of the task (new membership and training seeds), reports each pool's mean
and interval as a result would, and compares: the spread of the means across pools (the
truth about how much a reported mean varies) against the standard error the interval assumes,
and how often each pool's interval covers the mean over all pools. A bootstrap over examples
(resampling the pool's examples, targets kept) is shown beside it. Run by hand:

    python benchmarks/interval_check.py --task digits-mlp --pools 8
"""

from __future__ import annotations

import argparse
import platform
from datetime import datetime, timezone

import numpy as np
import torch
from scipy.stats import t as student_t

from mia_ptq_bench.attack import ShadowSet, run_attacks
from mia_ptq_bench.cache import default_cache_dir, in_use
from mia_ptq_bench.data import load_dataset
from mia_ptq_bench.metrics import attack_metrics, summarize
from mia_ptq_bench.pool import build_pool
from mia_ptq_bench.spec import load_task

METRICS = ("TPR@0.1%", "TPR@1%", "AUC")


def per_target(spec, pool, attack: str, examples: np.ndarray | None = None) -> np.ndarray:
    """(T, 3) per-target metrics of one attack on full-precision targets (optionally on a resample of examples)."""
    targets = np.arange(spec.targets.count)
    shadows = ShadowSet(pool.scores, np.arange(spec.membership.n_models))
    membership = run_attacks(spec, pool.keep, shadows, targets, pool.scores[targets])[attack]
    rows = []
    for row, target in enumerate(targets):
        labels, scores = pool.keep[target], membership[row]
        if examples is not None:
            labels, scores = labels[examples], scores[examples]
        m = attack_metrics(labels, scores)
        rows.append((m.low_fpr[0].tpr, m.low_fpr[1].tpr, m.auc))
    return np.array(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits-mlp")
    parser.add_argument("--pools", type=int, default=8)
    parser.add_argument("--attack", default="lira-online")
    parser.add_argument("--bootstrap", type=int, default=200)
    args = parser.parse_args()
    base = load_task(args.task)
    dataset = load_dataset(base.dataset)
    means, halves, boot_sd = [], [], []
    with in_use(default_cache_dir(), [base.id]):  # a `cache clear` is refused while the pools are read
        for seed in range(args.pools):
            spec = base.model_copy(update={"membership": base.membership.model_copy(update={"seed": seed}),
                                           "training": base.training.model_copy(update={"seed": seed})})
            pool = build_pool(spec, dataset, default_cache_dir())
            values = per_target(spec, pool, args.attack)
            stats = [summarize(values[:, k], bounds=None) for k in range(3)]
            means.append([s.mean for s in stats])
            halves.append([s.ci_high - s.mean for s in stats])
            rng = np.random.default_rng(seed)
            n = pool.keep.shape[1]
            resampled = [per_target(spec, pool, args.attack, rng.integers(0, n, n)).mean(axis=0)
                         for _ in range(args.bootstrap if seed == 0 else 0)]
            if resampled:
                boot_sd = np.std(resampled, axis=0, ddof=1)
            print(f"pool {seed}: " + ", ".join(f"{name} {100 * s.mean:.3f} ± {100 * (s.ci_high - s.mean):.3f}"
                                              for name, s in zip(METRICS, stats)), flush=True)
    means, halves = np.array(means), np.array(halves)
    grand = means.mean(axis=0)
    covered = (np.abs(means - grand) <= halves).mean(axis=0)
    print(f"\n# {args.task}, {args.attack}, full-precision targets, {args.pools} independent pools of "
          f"{base.membership.n_models} models, {base.targets.count} targets each")
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'metric':10} {'SD of means across pools':>26} {'t-interval SE (mean)':>22} {'ratio':>7} "
          f"{'covers grand mean':>18} {'bootstrap SD (pool 0)':>22}")
    for k, name in enumerate(METRICS):
        se = halves[:, k].mean() / student_t.ppf(0.975, base.targets.count - 1)  # half-width / t = standard error
        sd = means[:, k].std(ddof=1)
        print(f"{name:10} {100 * sd:>25.3f}% {100 * se:>21.3f}% {sd / se:>7.2f} {covered[k]:>17.0%} "
              f"{100 * boot_sd[k]:>21.3f}%")


if __name__ == "__main__":
    main()
