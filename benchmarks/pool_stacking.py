"""Pool training on the CPU: one model at a time against stacked (vmapped) groups, in the same run.

    python benchmarks/pool_stacking.py [--task digits-mlp] [--models 32]

Prints wall time and models per second of each trainer and the ratio against the
sequential baseline measured here, plus the largest score difference between
the two pools (they follow the same schedules, so only float rounding differs). Both build
in this process (``workers=1``); benchmarks/pool_training.py times the worker processes.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mia_ptq_bench.data import load_dataset
from mia_ptq_bench.pool import build_pool
from mia_ptq_bench.spec import load_task


def timed_pool(spec, data, trainer: str, stack: int):
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        pool = build_pool(spec, data, Path(cache), trainer=trainer, stack=stack, workers=1)
        return time.perf_counter() - start, pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits-mlp")
    parser.add_argument("--models", type=int, default=32, help="pool size to train (overrides the task's)")
    args = parser.parse_args()
    spec = load_task(args.task)
    spec = spec.model_copy(update={"membership": spec.membership.model_copy(update={"n_models": args.models}),
                                   "targets": spec.targets.model_copy(update={"count": 1})})
    data = load_dataset(spec.dataset)
    print(f"task {spec.id} · {args.models} models · {len(data.pool)} pool examples · "
          f"{platform.processor() or platform.machine()} · torch {torch.__version__} · {torch.get_num_threads()} threads")
    baseline, reference = timed_pool(spec, data, "sequential", 1)
    print(f"{'sequential':>14}: {baseline:7.2f} s  {args.models / baseline:6.2f} models/s  ratio 1.00")
    for stack in (8, 16, 32):
        if stack > args.models:
            continue
        seconds, pool = timed_pool(spec, data, "stacked", stack)
        drift = float(np.abs(pool.scores - reference.scores).max())
        accuracy = pool.test_accuracy.mean() - reference.test_accuracy.mean()
        print(f"{'stacked x' + str(stack):>14}: {seconds:7.2f} s  {args.models / seconds:6.2f} models/s  "
              f"ratio {baseline / seconds:.2f}  max score diff {drift:.1e}  mean acc diff {accuracy:+.4f}")


if __name__ == "__main__":
    main()
