"""A pilot of a task's pool: is the task affordable, accurate and leaky enough to publish?

    python benchmarks/task_pilot.py --task fashion-mnist-resnet --data-root DATA --models 16 --targets 4 --save

Trains a smaller pool of the task (``--models``, the task's recipe and data) with the stacked
trainer, timing each group, and reports:
  * the time per group and the time the task's full pool would take on this machine
    (groups of the same size, scaled to ``membership.n_models``; scoring included);
  * test accuracy of the pool models;
  * full-precision online LiRA per target (every other pilot model a shadow): TPR at
    0.1% FPR and the true positives it rests on, and the same with half the shadows, to
    show the trend as shadows are added;
  * the extrapolation to the task's targets: true positives per target times
    ``targets.count``. With more shadows online LiRA estimates each example's IN and OUT
    distributions better, so the pilot's per-target figure is a conservative estimate.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mia_ptq_bench.atomic import write_text_atomic
from mia_ptq_bench.attack.lira import lira_online
from mia_ptq_bench.cache import in_use
from mia_ptq_bench.data import load_dataset
from mia_ptq_bench.metrics.roc import attack_metrics
from mia_ptq_bench.pool import build_pool
from mia_ptq_bench.pool.train import auto_stack
from mia_ptq_bench.spec import load_task

LINES: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


class Timed:
    """A Progress that logs the wall time of every finished group."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.last = time.perf_counter()

    def start(self, key, description, total) -> None:
        say(description)
        self.last = time.perf_counter()

    def advance(self, key, amount=1) -> None:
        now = time.perf_counter()
        self.times.append(now - self.last)
        say(f"  group {len(self.times)} trained and scored in {now - self.last:.1f} s "
            f"(load average {os.getloadavg()[0]:.2f})")
        self.last = now

    def log(self, message: str) -> None:
        say(message)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="fashion-mnist-resnet")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--models", type=int, default=16)
    parser.add_argument("--targets", type=int, default=4)
    parser.add_argument("--cache", default=None, help="pool cache folder (default: a temporary one)")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    task = load_task(args.task)
    spec = task.model_copy(update={
        "membership": task.membership.model_copy(update={"n_models": args.models}),
        "targets": task.targets.model_copy(update={"count": args.targets})})
    data = load_dataset(spec.dataset, args.data_root)
    started = datetime.datetime.now()
    group = auto_stack(spec, data, torch.device("cpu"))
    full_group = auto_stack(task, data, torch.device("cpu"))
    say(f"# task pilot · {started:%Y-%m-%d %H:%M} · {task.id}: {args.models} of {task.membership.n_models} models, "
        f"{args.targets} of {task.targets.count} targets")
    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads · load average {os.getloadavg()[0]:.2f} · "
        f"{len(data.pool)} pool images, {len(data.test)} test · groups of {group} (the full pool: {full_group})")
    progress = Timed()
    with tempfile.TemporaryDirectory() as scratch:
        cache = Path(args.cache or scratch)
        with in_use(cache, [spec.id]):  # in a given cache folder, a `cache clear` is refused meanwhile
            pool = build_pool(spec, data, cache, progress=progress)
    per_model = float(np.mean([t / min(group, args.models - i * group) for i, t in enumerate(progress.times)]))
    say(f"time per model (training + scoring): {per_model:.1f} s; the task's {task.membership.n_models} models: "
        f"{per_model * task.membership.n_models / 60:.1f} min")
    acc = pool.test_accuracy
    say(f"test accuracy: mean {100 * acc.mean():.2f}%, min {100 * acc.min():.2f}%, max {100 * acc.max():.2f}%")

    say()
    say(f"full-precision online LiRA, {' + '.join(spec.queries)} queries:")
    say(f"{'target':>6} {'shadows':>8} {'AUC':>6} {'TPR@0.1%':>9} {'TP':>6} {'members':>8}")
    summed = {}
    for shadows_wanted in (args.models // 2, args.models - 1):
        summed[shadows_wanted] = 0
        for target in range(args.targets):
            others = [i for i in range(args.models) if i != target][:shadows_wanted]
            try:
                scores = lira_online(pool.scores[others], pool.keep[others], pool.scores[target])
            except ValueError as exc:  # with few shadows some example may lack an IN or an OUT model
                say(f"{target:6} {len(others):8} {exc}")
                continue
            metrics = attack_metrics(pool.keep[target], scores)
            low = metrics.low_fpr[0]
            summed[shadows_wanted] += low.true_positives
            say(f"{target:6} {len(others):8} {metrics.auc:6.3f} {100 * low.tpr:8.3f}% {low.true_positives:6} "
                f"{low.positives:8}")
    for shadows_wanted, total in summed.items():
        say(f"with {shadows_wanted} shadows: {total} true positives over {args.targets} targets, "
            f"{total / args.targets:.1f} per target -> {task.targets.count} targets: "
            f"~{total / args.targets * task.targets.count:.0f}")
    if args.save:
        path = Path(__file__).parent / "results" / f"task_pilot-{task.id}-{started:%Y%m%d-%H%M}.txt"
        write_text_atomic(path, "\n".join(LINES) + "\n")
        print(f"saved {path}")


if __name__ == "__main__":
    main()
