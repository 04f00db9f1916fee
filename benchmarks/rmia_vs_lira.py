"""RMIA against LiRA with k reference models per example, on the arrays of an evaluation (run by hand).

    mptq-bench evaluate fp32 --task digits-mlp --out /tmp/rmia-fp32
    python benchmarks/rmia_vs_lira.py /tmp/rmia-fp32/digits-mlp/fp32/fp32--oblivious.npz [more .npz ...]
        [--ks 2 4 8 63] [--seeds 5] [--out benchmarks/results/rmia_vs_lira.txt]

Each target is attacked as in the evaluation: its shadows are all other pool models
(leave-one-out), its population for RMIA is its own non-members. With k < all, every
example gets its own seeded choice of reference models (``select_references``): offline k
OUT models, online k/2 IN and k/2 OUT, the same choice for RMIA and LiRA; the table
averages over ``--seeds`` choices and shows the spread of the mean TPR over seeds. k = 63
(or any k at least the shadow count) means every other pool model, unbalanced 31/32.

LiRA with one IN and one OUT model (online, k = 2) has no per-example variance, so only
the fixed-variance variant is reported there. The stored LiRA scores of the evaluation
are recomputed at k = all as a check of the wiring.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import scipy
import sklearn
import torch

from mia_ptq_bench.attack import leave_one_out
from mia_ptq_bench.attack.lira import lira_offline, lira_online
from mia_ptq_bench.attack.rmia import (
    GAMMA,
    OFFLINE_A,
    rmia_offline,
    rmia_online,
    select_references,
)
from mia_ptq_bench.environment import processor_name
from mia_ptq_bench.metrics import attack_metrics, summarize

from machine import cpu_kernels

ATTACKS = (  # name, online?, function of (shadow, shadow_in, target, population, references)
    ("RMIA offline", False, lambda s, i, t, p, r: rmia_offline(s, i, t, p, references=r)),
    ("RMIA online", True, lambda s, i, t, p, r: rmia_online(s, i, t, p, references=r)),
    ("LiRA offline", False, lambda s, i, t, p, r: lira_offline(s, i, t, references=r)),
    ("LiRA offline fixed-var", False, lambda s, i, t, p, r: lira_offline(s, i, t, fixed_variance=True, references=r)),
    ("LiRA online", True, lambda s, i, t, p, r: lira_online(s, i, t, references=r)),
    ("LiRA online fixed-var", True, lambda s, i, t, p, r: lira_online(s, i, t, fixed_variance=True, references=r)),
)


def offline_a(a):
    return lambda s, i, t, p, r: rmia_offline(s, i, t, p, references=r, a=a)


def per_example_denominator(s, i, t, p, r, gamma=2.0):
    """What the library refuses to do: divide by |Z \\ {x}|, which is |Z| - 1 exactly for non-members."""
    plain = rmia_offline(s, i, t, p, references=r, gamma=gamma, tie_break=False)
    return plain * p.sum() / (p.sum() - p)


SENSITIVITY = (  # a and gamma chosen knowing the labels would be an upper bound, not an attack
    [(f"RMIA offline a={a:.1f}", False, offline_a(a)) for a in (0.0, 0.3, 0.6, 1.0)]
    + [("RMIA offline, no tie-break", False, lambda s, i, t, p, r: rmia_offline(s, i, t, p, references=r,
                                                                               tie_break=False)),
       ("RMIA offline g=2", False, lambda s, i, t, p, r: rmia_offline(s, i, t, p, references=r, gamma=2.0)),
       ("RMIA offline g=2, no tie-break", False, lambda s, i, t, p, r: rmia_offline(s, i, t, p, references=r,
                                                                                   gamma=2.0, tie_break=False)),
       ("RMIA online g=2, no tie-break", True, lambda s, i, t, p, r: rmia_online(s, i, t, p, references=r,
                                                                                gamma=2.0, tie_break=False)),
       ("RMIA offline g=2, |Z\\{x}| denom.", False, per_example_denominator)]
)


def machine() -> str:
    cpu = f"{processor_name()} ({cpu_kernels()})"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return (f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()} · python {sys.version.split()[0]}"
            f" · numpy {np.__version__} · scipy {scipy.__version__} · scikit-learn {sklearn.__version__}"
            f" · torch {torch.__version__} · commit {commit} · {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def evaluate(arrays, attacks, ks, seeds):
    """{(k, name): one (targets x 5) array per seed: TPR@0.1%, TP@0.1%, TPR@1%, TP@1%, AUC}."""
    keep, targets = arrays["keep"], arrays["targets"]
    shadow_all, target_all = arrays["shadow_scores"], arrays["target_scores"]
    models = keep.shape[0]
    results = {}
    for k in ks:
        use_all = k >= models - 1
        for seed in ([0] if use_all else range(seeds)):
            rows = {name: [] for name, _, _ in attacks}
            for row, target in enumerate(targets):
                shadows = leave_one_out(models, int(target))
                shadow, shadow_in, labels = shadow_all[shadows], keep[shadows], keep[int(target)]
                chosen = {}
                for online in (False, True):
                    chosen[online] = None if use_all else select_references(
                        shadow_in, k, online=online, seed=1000 * seed + int(target))
                for name, online, attack in attacks:
                    if name == "LiRA online" and k == 2 and not use_all:
                        continue  # one IN and one OUT model: no per-example variance
                    scores = attack(shadow, shadow_in, target_all[row], ~labels, chosen[online])
                    m = attack_metrics(labels, scores)
                    low, one = m.low_fpr
                    rows[name].append((low.tpr, low.true_positives, one.tpr, one.true_positives, m.auc))
            for name, values in rows.items():
                if values:
                    results.setdefault((models - 1 if use_all else k, name), []).append(np.array(values, dtype=float))
    return results


def check_against_stored(arrays) -> str:
    keep, targets = arrays["keep"], arrays["targets"]
    worst = 0.0
    for row, target in enumerate(targets):
        shadows = leave_one_out(keep.shape[0], int(target))
        for name, fn in (("lira-online", lira_online), ("lira-offline", lira_offline)):
            key = f"membership__{name}"
            if key in arrays:
                ours = fn(arrays["shadow_scores"][shadows], keep[shadows], arrays["target_scores"][row])
                worst = max(worst, float(np.abs(ours - arrays[key][row]).max()))
    return f"LiRA at k = all reproduces the stored membership scores: max |difference| = {worst:.1e}"


def table(results) -> list[str]:
    lines = [(f"{'k':>4}  {'attack':34} {'TPR@0.1%':>8} {'±CI':>6} {'seed range':>13} {'TP':>7} {'TPR@1%':>8} "
             f"{'TP':>7} {'AUC':>6}")]
    previous = None
    for (k, name), per_seed in results.items():
        if previous is not None and k != previous:
            lines.append("")
        previous = k
        stack = np.stack(per_seed)  # seeds x targets x fields
        tpr01 = stack[:, :, 0].mean(axis=1)
        ci = summarize(stack[:, :, 0].mean(axis=0), bounds=None)
        spread = f"[{100 * tpr01.min():.2f}-{100 * tpr01.max():.2f}]" if len(per_seed) > 1 else ""
        lines.append(f"{k!s:>4}  {name:34} {100 * tpr01.mean():>7.2f}% {100 * (ci.ci_high - ci.mean):>6.2f} "
                     f"{spread:>13} {stack[:, :, 1].sum(axis=1).mean():>7.1f} {100 * stack[:, :, 2].mean():>7.2f}% "
                     f"{stack[:, :, 3].sum(axis=1).mean():>7.1f} {stack[:, :, 4].mean():>6.3f}")
    return lines


PAIRS = (("RMIA offline", "LiRA offline"), ("RMIA offline", "LiRA offline fixed-var"),
         ("RMIA online", "LiRA online"), ("RMIA online", "LiRA online fixed-var"))


def paired(results) -> list[str]:
    """Per target (seed-averaged) TPR@0.1% differences: mean ± 95% CI, and targets won/lost."""
    lines = [("paired over targets, TPR@0.1% of RMIA minus LiRA (percentage points, mean ± 95% CI; "
              "targets where RMIA is higher/lower):")]
    for k in dict.fromkeys(key[0] for key in results):
        cells = []
        for ours, theirs in PAIRS:
            if (k, ours) not in results or (k, theirs) not in results:
                continue
            a = np.stack(results[(k, ours)])[:, :, 0].mean(axis=0)
            b = np.stack(results[(k, theirs)])[:, :, 0].mean(axis=0)
            d = summarize(100 * (a - b), bounds=None)
            cells.append(f"{ours.split()[1]} vs {theirs.removeprefix('LiRA ')}: {d.mean:+.2f} ± {d.ci_high - d.mean:.2f} "
                         f"({int((a > b).sum())}/{int((a < b).sum())})")
        lines.append(f"{k!s:>4}  " + "; ".join(cells))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("npz", nargs="+", type=Path)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 63])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    lines = ["RMIA vs LiRA with k reference models per example (offline: k OUT; online: k/2 IN + k/2 OUT)",
             f"RMIA: gamma={GAMMA}, a={OFFLINE_A}, population = the target's non-members, ties broken by the ratio.",
             (f"TPR: mean over targets and over {args.seeds} seeded reference choices (k < all); ±CI: 95% t-interval "
              "half-width over targets (percentage points); seed range: min-max of the per-seed means;"),
             "TP: true positives summed over targets (mean over seeds). k = 63 is every other pool model.",
             f"machine: {machine()}", ""]
    for path in args.npz:
        arrays = dict(np.load(path))
        keep, targets = arrays["keep"], arrays["targets"]
        negatives = [int((~keep[int(t)]).sum()) for t in targets]
        positives = sum(int(keep[int(t)].sum()) for t in targets)
        allowed = {level: sorted({math.ceil(level * n) - 1 for n in negatives}) for level in (0.001, 0.01)}
        queries = arrays["shadow_scores"].shape[2]
        lines += [f"== {path} ==",
                  (f"{keep.shape[0]} pool models, {keep.shape[1]} examples, {queries} quer{'y' if queries == 1 else 'ies'}"
                   f", {len(targets)} targets; P = {positives} members summed over targets; non-members per target "
                   f"{min(negatives)}-{max(negatives)}, so a target may have {allowed[0.001]} false positives at 0.1% "
                   f"FPR and {allowed[0.01]} at 1%."),
                  check_against_stored(arrays), ""]
        results = evaluate(arrays, ATTACKS, args.ks, args.seeds)
        lines += table(results) + [""] + paired(results)
        lines += ["", "sensitivity (a or gamma chosen after seeing these rows would be an upper bound, not an attack);",
                  "g = gamma; the last row divides by |Z \\ {x}| as the library refuses to (that denominator is the label):"]
        lines += table(evaluate(arrays, SENSITIVITY, [2, 63], args.seeds))
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
