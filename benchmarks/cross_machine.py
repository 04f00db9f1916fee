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

``--jackknife`` adds the retrained-pool tolerance as ``reproduce`` applies it: for a result with a
number outside the plain tolerance, the standard error the larger of the spread over targets and
the rerun's jackknife over its pool models (``results/jackknife.py``), from the rerun's arrays (the
``.npz`` beside each document; a result without them keeps the spread over targets, and the output
says how many); and a table of how well each standard error, applied to every number, describes
the move between the two sides. That costs about 17
reruns of each result's attacks (a minute or two per fashion-mnist-resnet result on 2 cores), so
``--spread-cache DIR`` keeps each result's standard errors by its arrays' sha256 for the next run.

``--borrow-spread`` gives a rerun without arrays the committed side's jackknife instead (not the
rule, which takes the rerun's: an estimate of what it would allow, for results whose arrays are gone).

``--ranks`` adds what the two sides' claims share: per board, the pairs of ranked entries whose 95%
intervals of TPR@0.1%FPR are apart (as the site ranks them) on both sides, one side or opposite ways;
and per quantized result, the findings' paired verdicts (quantized minus full precision over the same
targets: a real change or within noise) on both sides, with how far each difference moved.

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
import hashlib
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe, save, say  # noqa: E402

from mia_ptq_bench.atomic import write_text_atomic  # noqa: E402
from mia_ptq_bench.board.collect import STRONGEST  # noqa: E402
from mia_ptq_bench.board.rank import tied_ranks  # noqa: E402
from mia_ptq_bench.findings.render import accuracy, significant, tpr  # noqa: E402
from mia_ptq_bench.results.compare import (RETRAINED_POOL, RETRAINED_SE, SAME_POOL, PoolSpread,  # noqa: E402
                                           allowed_change, compare_results, headline_stats, needs_pool_spread,
                                           regime, retrained_standard_error)
from mia_ptq_bench.results.io import load_arrays, load_result  # noqa: E402
from mia_ptq_bench.results.jackknife import JACKKNIFE_VERSION, result_pool_spread  # noqa: E402
from mia_ptq_bench.spec import load_registered_task  # noqa: E402
from mia_ptq_bench.submission.schema import REFERENCE_ENTRIES  # noqa: E402

JACKKNIFE = "retrained, jackknife"

SUBMISSIONS = Path(__file__).parents[1] / "submissions"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rerun", type=Path, required=True, help="the --out folder of evaluate runs on this machine")
    parser.add_argument("--task", required=True)
    parser.add_argument("--submissions", type=Path, default=SUBMISSIONS)
    parser.add_argument("--both-ways", action="store_true", help="also compare with the roles swapped")
    parser.add_argument("--jackknife", action="store_true",
                        help="also the retrained tolerance with the rerun's jackknife over its pool models")
    parser.add_argument("--spread-cache", type=Path, help="keep each result's jackknife here, by its arrays' sha256")
    parser.add_argument("--borrow-spread", action="store_true",
                        help="a rerun without arrays takes the committed side's jackknife (an estimate, not the rule)")
    parser.add_argument("--ranks", action="store_true",
                        help="also whether the boards' significant rank differences hold on both sides")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()

    pairs = []
    for path in sorted((args.rerun / args.task).glob("*/*--*.json")):
        committed = args.submissions / path.parent.name / "results" / args.task / path.name
        if committed.is_file():
            pairs.append((path.parent.name, (committed, load_result(committed)), (path, load_result(path))))
    if not pairs:
        raise SystemExit(f"no result under {args.rerun / args.task} has a committed counterpart in {args.submissions}")

    say(f"# cross-machine comparison · {datetime.datetime.now():%Y-%m-%d %H:%M} · task {args.task}")
    say(describe() + " (this machine; the results name their own)")
    spreads = Spreads(args.spread_cache, args.borrow_spread) if args.jackknife else None
    compare_all(pairs, spreads)
    if args.both_ways:
        say()
        say("## the same with the roles swapped: the reruns taken as committed, the committed results as reruns")
        compare_all([(quantizer, rerun, committed) for quantizer, committed, rerun in pairs], spreads)
    if args.ranks:
        headline = load_registered_task(args.task).attacks[0]  # the headline board's attack, as board/build.py
        rank_stability(pairs, headline)
        paired_verdicts(pairs, headline)
    if args.save:
        save(f"cross_machine-{args.task}-{datetime.datetime.now():%Y%m%d-%H%M}.txt")


class Spreads:
    """Each rerun's jackknife standard errors (``results/jackknife.py``) from the arrays beside it, kept by their sha256."""

    def __init__(self, cache: Path | None, borrow: bool = False) -> None:
        self.cache, self.borrow = cache, borrow
        self.references: dict[str, dict[str, float]] = {}  # one run's results share their reference's
        self.found: dict[Path, PoolSpread | None] = {}

    def of(self, path: Path, result) -> PoolSpread | None:
        """None where the arrays are not beside the document, or the task has changed since the result."""
        if path not in self.found:
            self.found[path] = self._measure(path, result)
        return self.found[path]

    def _measure(self, path: Path, result) -> PoolSpread | None:
        spec = load_registered_task(result.task.id)
        if spec.hash != result.task.hash or not path.with_name(result.arrays.file).is_file():
            return None
        kept = self.cache / f"{result.arrays.sha256}-task{spec.hash[:12]}-v{JACKKNIFE_VERSION}.json" if self.cache else None
        if kept is not None and kept.is_file():
            return PoolSpread(**json.loads(kept.read_text()))
        arrays = load_arrays(path, result)
        key = hashlib.sha256(arrays["reference_scores"].tobytes() + arrays["keep"].tobytes()).hexdigest()
        spread = result_pool_spread(spec, result, arrays, self.references.get(key))
        self.references[key] = spread.reference
        if kept is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(kept, json.dumps({"quantized": spread.quantized, "reference": spread.reference}))
        return spread


def compare_all(pairs: list, spreads: Spreads | None) -> None:
    """Every (quantizer, committed, rerun) pair's numbers over both tolerances of another machine (and, with
    ``spreads``, the retrained one with the rerun's jackknife); committed and rerun are (path, result)."""
    for name, (_, result) in (("committed", pairs[0][1]), ("rerun", pairs[0][2])):
        environment = result.environment
        say(f"{name}: processor {environment.processor or 'not recorded'} · platform {environment.platform} · "
            f"CPU capability {environment.cpu_capability} · torch {environment.packages.get('torch')} with "
            f"{environment.torch_threads} threads")
    say()
    say("|difference| / tolerance, per result, for both tolerances of another machine (<= 1 passes):")
    say("  same pool: max(1/4 of the 95% half-width, resolution); widths and resolutions are the rerun's")
    say(f"  retrained pool: max({RETRAINED_SE:g} standard errors of the difference of two means, resolution)")
    tolerances = [SAME_POOL, RETRAINED_POOL]
    if spreads is not None:
        say(f"  {JACKKNIFE}: the same, but for a result with a number outside it the standard error at least the "
            "rerun's jackknife over its models (the rule)")
        tolerances.append(JACKKNIFE)
    heads = {SAME_POOL: "same pool", RETRAINED_POOL: "retrained", JACKKNIFE: "jackknife"}
    say(f"{'quantizer':10} {'result':28} {'case':15} {'numbers':>7} "
        + " ".join(f"{heads[t] + ': median':>17} {'max':>5}" for t in tolerances)
        + "  largest (last tolerance)")
    ratios: dict[str, list[float]] = {t: [] for t in tolerances}
    cases, without, borrowed = set(), 0, 0
    for quantizer, (committed_path, committed), (rerun_path, rerun) in pairs:
        case = regime(committed, rerun)
        cases.add(case)
        rows = {}
        plain = compare_results(committed, rerun, RETRAINED_POOL)
        for tolerance in tolerances:  # what `mptq-bench reproduce` would compare, under each tolerance in turn
            if tolerance == RETRAINED_POOL or (tolerance == JACKKNIFE and not needs_pool_spread(RETRAINED_POOL, plain)):
                found = plain
            elif tolerance == JACKKNIFE:
                spread = spreads.of(rerun_path, rerun)
                if spread is None and spreads.borrow:
                    spread = spreads.of(committed_path, committed)
                    borrowed += spread is not None
                without += spread is None
                found = compare_results(committed, rerun, RETRAINED_POOL, spread)
            else:
                found = compare_results(committed, rerun, tolerance)
            rows[tolerance] = [(abs(c.rerun - c.committed) / c.tolerance,
                                f"{'fp32 ref ' if c.result.endswith('(fp32 ref)') else ''}{c.metric}") for c in found]
            ratios[tolerance] += [r for r, _ in rows[tolerance]]
        columns = [np.array([r for r, _ in rows[t]]) for t in tolerances]
        say(f"{quantizer:10} {committed.plan + '--' + committed.threat_model:28} {case:15} {len(columns[0]):7d} "
            + " ".join(f"{np.median(c):17.2f} {c.max():5.2f}" for c in columns) + f"  {max(rows[tolerances[-1]])[1]}")
    say()
    say("over all results (they share their fp32 reference, so the numbers are not independent):")
    for tolerance, found in ratios.items():
        values = np.array(found)
        say(f"  {tolerance + ':':21} median {np.median(values):.2f}, 90% {np.quantile(values, 0.9):.2f}, "
            f"99% {np.quantile(values, 0.99):.2f}, max {values.max():.2f}; outside: {int((values > 1).sum())} "
            f"of {len(values)}")
    if spreads is not None:
        calibration(pairs, spreads)
    if borrowed:
        say(f"  ({borrowed} rerun(s) without arrays: their {JACKKNIFE} rows take the committed side's jackknife, "
            "an estimate of the rule, which takes the rerun's)")
    if without:
        say(f"  ({without} rerun(s) without arrays: their {JACKKNIFE} rows keep the spread over targets)")
    say(f"cases seen: {', '.join(sorted(cases))}")


def calibration(pairs: list, spreads: Spreads) -> None:
    """How well each standard error describes the move between the two sides: |difference| / (sqrt(2) SE) is
    |N(0, 1)| (median 0.67, 90% 1.64) if SE is right; over the numbers that moved more than their resolution."""
    found: dict[str, list[tuple[float, float]]] = {}
    widening: dict[str, list[float]] = {}  # the jackknife's tolerance over the plain one, every number
    for _, (committed_path, committed), (rerun_path, rerun) in pairs:
        spread = spreads.of(rerun_path, rerun) or (spreads.of(committed_path, committed) if spreads.borrow else None)
        if spread is None:
            continue
        for which in ("quantized", "reference"):
            errors = getattr(spread, which)
            group = f"{which}, {rerun.threat_model}" if which == "quantized" else "fp32 reference"
            for metric, a, b, resolution, floor in headline_stats(getattr(committed, which), getattr(rerun, which),
                                                                  rerun.n_test):
                pool_se = errors.get(metric, 0.0)
                widening.setdefault(group, []).append(allowed_change(b, resolution, RETRAINED_POOL, floor, pool_se)
                                                      / allowed_change(b, resolution, RETRAINED_POOL, floor))
                moved = abs(b.mean - a.mean)
                if moved <= resolution:
                    continue
                found.setdefault(group, []).append(tuple(
                    moved / (math.sqrt(2) * max(retrained_standard_error(b, floor, se), 1e-12)) for se in (0.0, pool_se)))
    say("|difference| / (sqrt(2) SE), over the numbers that moved more than their resolution (|N(0,1)|: median 0.67, "
        "90% 1.64):")
    say(f"  {'numbers':28} {'count':>5}  {'SE = s / sqrt(targets)':>30}  {'SE = max(that, jackknife)':>30}  "
        "the jackknife's tolerance / the plain one, every number")
    for group, values in sorted(found.items()):
        z, wider = np.array(values), np.array(widening[group])
        say(f"  {group:28} {len(z):5d}  " + "  ".join(
            f"median {np.median(z[:, i]):4.2f} 90% {np.quantile(z[:, i], 0.9):5.2f} max {z[:, i].max():5.2f}" for i in (0, 1))
            + f"  median {np.median(wider):4.2f} 90% {np.quantile(wider, 0.9):5.2f} max {wider.max():5.2f}")



def rank_stability(pairs: list, headline_attack: str) -> None:
    """Whether what a board claims holds on both sides: per board (threat model, plan, the task's attack or each
    target's strongest), every pair of ranked entries (the references aside) is significantly
    apart on a side where one's 95% interval of TPR@0.1%FPR lies wholly below the other's, as board/rank.py
    ranks them. Also |difference of the pair's two differences| / SE, SE from the four spreads over targets:
    |N(0, 1)| (median 0.67) if the pool moved two entries independently by their own standard errors."""
    say()
    say("## the boards' rank claims on both sides: pairs of ranked entries, TPR@0.1%FPR, 95% intervals apart")
    say(f"{'threat model':14}{'view':13}{'pairs':>6}{'both':>6}{'one side':>10}{'reversed':>10}{'entry ranks moved':>19}"
        f"{'|z| diff: median':>18}{'90%':>6}{'max':>6}")
    sides = {}
    for quantizer, (_, committed), (_, rerun) in pairs:
        if quantizer not in REFERENCE_ENTRIES and committed.plan != "fp32":
            sides.setdefault((committed.threat_model, committed.plan), {})[quantizer] = (committed, rerun)
    threats = sorted({threat for threat, _ in sides})
    for threat in threats:
        for view in (headline_attack, STRONGEST):
            counts, moved, entries, zs = [0, 0, 0, 0], 0, 0, []
            for (t, plan), results in sorted(sides.items()):
                if t != threat or len(results) < 2:
                    continue
                stats = {q: [r.quantized.strongest.tpr_at_0_1pct_fpr if view == STRONGEST
                             else r.quantized.attacks[view].tpr_at_0_1pct_fpr for r in pair]
                         for q, pair in results.items()}
                names = sorted(stats)
                ranks = []
                for side in (0, 1):
                    low = pd.Series([stats[q][side].ci_low for q in names])
                    high = pd.Series([stats[q][side].ci_high for q in names])
                    ranks.append(tied_ranks(low, high, pd.Series([False] * len(names)))[0])
                moved += int((ranks[0] != ranks[1]).sum())
                entries += len(names)
                for a, b in itertools.combinations(names, 2):
                    _tally(counts, *[(stats[a][side].ci_high < stats[b][side].ci_low)
                                     - (stats[b][side].ci_high < stats[a][side].ci_low) for side in (0, 1)])
                    change = ((stats[a][0].mean - stats[b][0].mean) - (stats[a][1].mean - stats[b][1].mean))
                    se = math.sqrt(sum(x.std ** 2 / x.n for q in (a, b) for x in stats[q]))
                    if se > 0:
                        zs.append(abs(change) / se)
            if not counts[0]:
                continue
            z = np.array(zs)
            say(f"{threat:14}{view:13}{counts[0]:>6}{counts[1]:>6}{counts[2]:>10}{counts[3]:>10}{f'{moved} of {entries}':>19}"
                f"{np.median(z):>18.2f}{np.quantile(z, 0.9):>6.2f}{z.max():>6.2f}")
    say("(both: apart the same way on both sides; one side: apart on one only; reversed: apart opposite ways)")


def paired_verdicts(pairs: list, headline_attack: str) -> None:
    """Whether the findings' verdicts hold on both sides: per quantized result, each target's number minus its
    full-precision reference's, a verdict where the 95% interval of that paired difference excludes zero
    (findings/render.py's ``significant``), and how far the difference moved in its SE (s / sqrt(n) on each
    side); the signed moves' median says whether the pool moved every result the same way."""
    say()
    say("## the findings' paired verdicts on both sides: quantized minus full precision, over the same targets")
    say(f"{'threat model':14}{'number':26}{'results':>8}{'both':>6}{'one side':>10}{'reversed':>10}{'|z|: median':>13}"
        f"{'90%':>6}{'max':>6}{'signed median (pp)':>20}")
    numbers = {f"{headline_attack} TPR@0.1%": lambda e: tpr(e, headline_attack),
               "strongest TPR@0.1%": lambda e: tpr(e, "strongest"), "test accuracy": accuracy}
    for threat in sorted({committed.threat_model for _, (_, committed), _ in pairs}):
        for label, values in numbers.items():
            if label == "test accuracy" and threat != "oblivious":
                continue  # the same models under every threat model
            counts, zs, moves = [0, 0, 0, 0], [], []
            for _, (_, committed), (_, rerun) in pairs:
                if committed.threat_model != threat or committed.plan == "fp32":
                    continue
                sides = [values(r.quantized) - values(r.reference) for r in (committed, rerun)]
                _tally(counts, *[int(np.sign(d.mean())) if significant(d) else 0 for d in sides])
                se = math.sqrt(sum(d.var(ddof=1) / len(d) for d in sides))
                moves.append(100 * (sides[1].mean() - sides[0].mean()))
                if se > 0:
                    zs.append(abs(sides[1].mean() - sides[0].mean()) / se)
            if not counts[0]:
                continue
            z = np.array(zs)
            say(f"{threat:14}{label:26}{counts[0]:>8}{counts[1]:>6}{counts[2]:>10}{counts[3]:>10}{np.median(z):>13.2f}"
                f"{np.quantile(z, 0.9):>6.2f}{z.max():>6.2f}{np.median(moves):>+20.2f}")
    say("(both: a verdict of the same sign on both sides; one side: a verdict on one side, within noise on the other)")


def _tally(counts: list[int], first: int, second: int) -> None:
    """Counts [pairs, the same way on both sides, on one side only, opposite ways] of two claims in {-1, 0, +1}."""
    counts[0] += 1
    if first and first == second:
        counts[1] += 1
    elif first * second == -1:
        counts[3] += 1
    elif first or second:
        counts[2] += 1


if __name__ == "__main__":
    main()
