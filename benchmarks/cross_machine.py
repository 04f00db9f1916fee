"""How far results computed on this machine land from the committed ones: the data behind the tolerances.

    mptq-bench evaluate rtn --task fashion-mnist-resnet --out RERUN ...   # on another machine
    python benchmarks/cross_machine.py --rerun RERUN --task fashion-mnist-resnet --save

For every result under ``--rerun`` (``<task>/<quantizer>/<plan>--<threat>.json``, as
``evaluate --out`` writes them) with a committed counterpart in ``submissions/<quantizer>/results``,
it compares every headline number ``mptq-bench reproduce`` compares and prints each difference
over the two tolerances of docs/reproducibility.md for another machine (same pool: a quarter of
the 95% half-width; retrained pool: 6 standard errors of the difference of two means):
per result the median and the largest, then over all results the quantiles and how many lie
outside. It says which case the two results are and on which machines they ran.

``--both-ways`` repeats the whole comparison with the roles swapped (the reruns taken as the
committed results and the committed ones as the reruns): the tolerances are the rerun's, so the
two directions differ, and a check by a machine like the committed one would see the second.
Results kept from another revision can be compared the same way, e.g. the results committed at
REV against today's:

    mkdir -p OLD/TASK && for q in submissions/*/; do q=$(basename $q); mkdir -p OLD/TASK/$q; \
      for f in $(git ls-tree --name-only REV submissions/$q/results/TASK/ | grep json$); do \
        git show REV:$f > OLD/TASK/$q/$(basename $f); done; done
    python benchmarks/cross_machine.py --rerun OLD --task TASK --both-ways --save
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe, save, say  # noqa: E402

from mia_ptq_bench.results.compare import RETRAINED_POOL, RETRAINED_SE, SAME_POOL, compare_results, regime  # noqa: E402
from mia_ptq_bench.results.io import load_result  # noqa: E402

SUBMISSIONS = Path(__file__).parents[1] / "submissions"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rerun", type=Path, required=True, help="the --out folder of evaluate runs on this machine")
    parser.add_argument("--task", required=True)
    parser.add_argument("--submissions", type=Path, default=SUBMISSIONS)
    parser.add_argument("--both-ways", action="store_true", help="also compare with the roles swapped")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()

    pairs = []
    for path in sorted((args.rerun / args.task).glob("*/*--*.json")):
        committed = args.submissions / path.parent.name / "results" / args.task / path.name
        if committed.is_file():
            pairs.append((path.parent.name, load_result(committed), load_result(path)))
    if not pairs:
        raise SystemExit(f"no result under {args.rerun / args.task} has a committed counterpart in {args.submissions}")

    say(f"# cross-machine comparison · {datetime.datetime.now():%Y-%m-%d %H:%M} · task {args.task}")
    say(describe() + " (this machine; the results name their own)")
    compare_all(pairs)
    if args.both_ways:
        say()
        say("## the same with the roles swapped: the reruns taken as committed, the committed results as reruns")
        compare_all([(quantizer, rerun, committed) for quantizer, committed, rerun in pairs])
    if args.save:
        save(f"cross_machine-{args.task}-{datetime.datetime.now():%Y%m%d-%H%M}.txt")


def compare_all(pairs: list) -> None:
    """Every (quantizer, committed, rerun) pair's numbers over both tolerances of another machine."""
    for name, environment in (("committed", pairs[0][1].environment), ("rerun", pairs[0][2].environment)):
        say(f"{name}: processor {environment.processor or 'not recorded'} · platform {environment.platform} · "
            f"CPU capability {environment.cpu_capability} · torch {environment.packages.get('torch')} with "
            f"{environment.torch_threads} threads")
    say()
    say("|difference| / tolerance, per result, for both tolerances of another machine (<= 1 passes):")
    say("  same pool: max(1/4 of the 95% half-width, resolution); widths and resolutions are the rerun's")
    say(f"  retrained pool: max({RETRAINED_SE:g} standard errors of the difference of two means, resolution)")
    say(f"{'quantizer':10} {'result':28} {'case':15} {'numbers':>7} {'same pool: median':>17} {'max':>5} "
        f"{'retrained: median':>17} {'max':>5}  largest (retrained)")
    ratios: dict[str, list[float]] = {SAME_POOL: [], RETRAINED_POOL: []}
    cases = set()
    for quantizer, committed, rerun in pairs:
        case = regime(committed, rerun)
        cases.add(case)
        # what `mptq-bench reproduce` would compare, under each tolerance in turn
        rows = {tolerance: [(abs(c.rerun - c.committed) / c.tolerance,
                             f"{'fp32 ref ' if c.result.endswith('(fp32 ref)') else ''}{c.metric}")
                            for c in compare_results(committed, rerun, tolerance)]
                for tolerance in (SAME_POOL, RETRAINED_POOL)}
        for tolerance, found in rows.items():
            ratios[tolerance] += [r for r, _ in found]
        same, retrained = (np.array([r for r, _ in rows[t]]) for t in (SAME_POOL, RETRAINED_POOL))
        say(f"{quantizer:10} {committed.plan + '--' + committed.threat_model:28} {case:15} {len(same):7d} "
            f"{np.median(same):17.2f} {same.max():5.2f} {np.median(retrained):17.2f} {retrained.max():5.2f}  "
            f"{max(rows[RETRAINED_POOL])[1]}")
    say()
    say("over all results (they share their fp32 reference, so the numbers are not independent):")
    for tolerance, found in ratios.items():
        values = np.array(found)
        say(f"  {tolerance + ':':15} median {np.median(values):.2f}, 90% {np.quantile(values, 0.9):.2f}, "
            f"99% {np.quantile(values, 0.99):.2f}, max {values.max():.2f}; outside: {int((values > 1).sum())} "
            f"of {len(values)}")
    say(f"cases seen: {', '.join(sorted(cases))}")


if __name__ == "__main__":
    main()
