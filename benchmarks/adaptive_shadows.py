"""How many quantized shadows does the adaptive attacker need? TPR at low FPR against that number.

Evaluates a quantizer on a task with every pool model quantized (the full adaptive attacker),
then attacks each target with only its first S quantized shadows (the other pool models in
index order), for several S, with each attack of the task and the strongest strategy chosen
on shadows alone. Prints one table per plan; run by hand:

    python benchmarks/adaptive_shadows.py --task digits-mlp --quantizer rtn --plans w2,w1.58
"""

from __future__ import annotations

import argparse
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from mia_ptq_bench.attack import ShadowSet, run_attacks
from mia_ptq_bench.cache import default_cache_dir
from mia_ptq_bench.metrics import attack_metrics
from mia_ptq_bench.runner import RunOptions, evaluate
from mia_ptq_bench.spec import load_task
from mia_ptq_bench.spec.schema import AdaptiveSpec


def table(arrays: dict, spec, counts: list[int]) -> list[str]:
    keep, targets = arrays["keep"], arrays["targets"]
    quantized = ShadowSet(arrays["shadows__adaptive__scores"], arrays["shadows__adaptive__models"])
    lines = [f"{'shadows':>8} " + " ".join(f"{a:>24}" for a in spec.attacks)]
    for count in counts:
        per_attack = {a: [] for a in spec.attacks}
        for row, target in enumerate(targets):
            chosen = [int(m) for m in quantized.models if m != target][:count]
            subset = ShadowSet(quantized.scores[np.isin(quantized.models, chosen + [int(target)])],
                               quantized.models[np.isin(quantized.models, chosen + [int(target)])])
            membership = run_attacks(spec, keep, subset, np.array([target]), arrays["target_scores"][row:row + 1])
            for attack, scores in membership.items():
                metrics = attack_metrics(keep[target], scores[0])
                per_attack[attack].append((metrics.low_fpr[0].true_positives, metrics.low_fpr[1].true_positives,
                                           metrics.low_fpr[0].positives))
        cells = []
        for attack in spec.attacks:
            tp01, tp1, positives = (sum(v) for v in zip(*per_attack[attack]))
            cells.append(f"{100 * tp01 / positives:6.2f}% {100 * tp1 / positives:6.2f}% ({tp01:4d})")
        lines.append(f"{count:>8} " + " ".join(f"{c:>24}" for c in cells))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits-mlp")
    parser.add_argument("--quantizer", default="rtn")
    parser.add_argument("--plans", default="w2,w1.58")
    parser.add_argument("--counts", default="8,16,32,63")
    parser.add_argument("--out", type=Path, default=Path("/tmp/adaptive-shadows"))
    args = parser.parse_args()
    spec = load_task(args.task)
    spec = spec.model_copy(update={"adaptive": AdaptiveSpec(shadows=spec.membership.n_models - 1)})  # every pool model
    counts = [int(c) for c in args.counts.split(",")]
    plans = args.plans.split(",")
    outcome = evaluate(args.quantizer, spec, plans=plans, threat_models=["adaptive"],
                       options=RunOptions(out_dir=args.out, cache_dir=default_cache_dir()))
    print(f"# {args.task}, {args.quantizer}, adaptive attacker with S quantized shadows per target; "
          f"{len(outcome.results[0].quantized.targets)} targets")
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("# cells: TPR@0.1%FPR TPR@1%FPR (true positives at 0.1%, summed over targets)")
    for plan, path in zip(plans, outcome.paths):
        with np.load(path.with_suffix(".npz")) as archive:
            arrays = {k: archive[k] for k in archive.files}
        print(f"\n## {plan}")
        print("\n".join(table(arrays, spec, counts)))


if __name__ == "__main__":
    main()
