"""How close a rerun must come to a committed result: the reproducibility contract, as pure functions.

The committed document is the submitter's word: how wide a tolerance is comes from what the
checker computed itself (the rerun), and which case applies from the checker's pool, loosened by
the document only where the checker trained that pool itself (then it cannot tell). Three cases (``regime``):

- ``identical``: the same environment (every field of ``Environment`` equal: package versions,
  Python, platform, processor, torch threads, CPU capability, deterministic flag, the torch
  settings that change float results, and the GPU for a CUDA run), and the same trained pool where the
  document names one (equal ``pool_digest``: the environment covers quantization and scoring, and a pool,
  cached by its task alone, may have been trained on another machine or under bfloat16 autocast). The
  rerun is bit-identical, so every number must be equal.
- ``same pool``: another environment, the same trained pool: the checker pulled the task's
  canonical pool from the Hub, or the document names the checker's very pool (equal
  ``pool_digest``; for documents from before digests, identical full-precision reference
  numbers). Only quantization, scoring and attacks round differently: a handful of examples
  change rank. Each headline number must lie within a quarter of the 95% interval's
  half-width, and never closer than its resolution requires: 5 examples over all targets for a
  rate (TPR, accuracy), 1e-4 for AUC. On digits-mlp even a pool retrained under other CPU
  kernels stayed within it (at most 4 true positives of 10,426 moved).
- ``retrained pool``: the checker trained its pool itself, and nothing it can trust says the
  result used that pool. Training on another CPU rounds differently, and over epochs of SGD the
  difference grows into another draw of the training noise: the numbers can agree only
  statistically. Each mean must lie within 6 standard errors of the difference of two
  independent draws, sqrt(2) SE. SE is the larger of s / sqrt(n), s the rerun's spread over its
  n targets, and the rerun's jackknife over its pool models (``results/jackknife.py``): the
  targets share their shadows (under the adaptive threats the shadows are the other targets), so
  another pool moves them together, further than s / sqrt(n) says. For a TPR, s is never taken below
  the binomial spread of a target's count at the rerun's pooled rate, read at that rate's 95% upper
  confidence bound (``sparse_count_spread``): at 0.1% FPR a target's TPR is a handful of true
  positives, and 16 such counts estimate their own spread poorly; the bound keeps a rerun whose
  targets mostly score 0 from allowing only the resolution. Measured on two fashion-mnist-resnet
  pools (an AMD EPYC's and an Intel Xeon's) in docs/reproducibility.md.

The widths and resolutions are the rerun's (its interval, spread, counts): a document's own
``std`` or ``ci_high`` cannot widen them. Beside the headline means, the identical case holds every
other number of the evaluations to equality (intervals, counts, per-target numbers, ROC curves);
in the other cases those are the rerun's to publish (the site shows a recomputed result's rerun).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from scipy.stats import chi2

from .schema import Environment, Evaluation, LowFprSummary, Result, Stat

IDENTICAL, SAME_POOL, RETRAINED_POOL = "identical", "same pool", "retrained pool"
SAME_POOL_SHARE = 0.25  # of the rerun's 95% interval's half-width
RETRAINED_SE = 6.0  # standard errors of the difference of two draws (measured on two pools: docs/reproducibility.md)
EXAMPLES_OF_SLACK = 5
AUC_RESOLUTION = 1e-4


@dataclass(frozen=True)
class PoolSpread:
    """Standard errors of a rerun's headline means over draws of its pool, by metric name
    (``headline_numbers``), of the quantized evaluation and of the full-precision reference."""

    quantized: dict[str, float]
    reference: dict[str, float]


@dataclass(frozen=True)
class Comparison:
    result: str  # "<plan>--<threat>"
    metric: str
    committed: float
    rerun: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return abs(self.rerun - self.committed) <= self.tolerance


def _accelerator(device: str) -> str:
    """The part of a device description that decides the kernels: a GPU's name, or just "cpu" (the
    CPU's own description repeats the machine and thread count, recorded in fields of their own)."""
    return device if device.startswith("cuda") else "cpu"


def same_environment(a: Environment, b: Environment) -> bool:
    return (a.model_dump(exclude={"device"}) == b.model_dump(exclude={"device"})
            and _accelerator(a.device) == _accelerator(b.device))


def same_pool(committed: Result, rerun: Result) -> bool:
    """Whether the rerun's pool is, by what the checker can trust, the one the result used: pulled from
    the task's Hub repository (the canonical pool, whatever the document says), or the document names
    this very pool (equal digests; for documents from before digests, the same full-precision
    reference numbers). Against a pulled pool no claim of the document loosens the case; against a pool
    the checker trained, a document can always claim another pool (docs/reproducibility.md)."""
    if rerun.pool_source is not None:
        return True
    if committed.pool_digest is not None:
        return committed.pool_digest == rerun.pool_digest
    return committed.reference == rerun.reference


def regime(committed: Result, rerun: Result) -> str:
    named = committed.pool_digest is None or committed.pool_digest == rerun.pool_digest
    if same_environment(committed.environment, rerun.environment) and named:
        return IDENTICAL
    return SAME_POOL if same_pool(committed, rerun) else RETRAINED_POOL


def half_width(stat: Stat) -> float:
    """A 95% interval's half-width (the wider side, where clipping to [0, 1] made it lopsided)."""
    return max(stat.mean - stat.ci_low, stat.ci_high - stat.mean)


def allowed_change(stat: Stat, resolution: float, case: str = SAME_POOL, spread_floor: float = 0.0,
                   pool_se: float = 0.0) -> float:
    """How far the rerun's mean may lie from the committed one, from the rerun's own ``stat`` (computed
    by the checker: nothing the document states widens it): 0 when identical; with the same pool a
    quarter of the interval's half-width; with a retrained pool ``RETRAINED_SE`` standard errors of
    the difference of two independent draws of the mean, sqrt(2) SE, SE the larger of s / sqrt(n)
    (s the rerun's spread over targets, but at least ``spread_floor``) and ``pool_se`` (the rerun's
    jackknife over its models, ``results/jackknife.py``, which also sees what the targets share);
    never less than ``resolution``."""
    if case == IDENTICAL:
        return 0.0
    if case == SAME_POOL:
        return max(SAME_POOL_SHARE * half_width(stat), resolution)
    return max(RETRAINED_SE * math.sqrt(2) * retrained_standard_error(stat, spread_floor, pool_se), resolution)


def retrained_standard_error(stat: Stat, spread_floor: float = 0.0, pool_se: float = 0.0) -> float:
    """The standard error of a mean over another draw of the pool: the larger of s / sqrt(n), s the spread over
    targets but at least ``spread_floor``, and ``pool_se``, the jackknife over the pool's models."""
    return max(max(stat.std, spread_floor) / math.sqrt(max(stat.n, 1)), pool_se)


def sparse_count_spread(stat: LowFprSummary) -> float:
    """The spread over targets a TPR's counts have at least: the binomial sd sqrt(p (1 - p) / members per
    target), p the rerun's pooled rate (true positives over positives) at its one-sided 95% Poisson upper
    bound, so that a rerun whose targets score 0, 1 or 2 true positives is not taken at its word that
    they hardly vary. From the rerun's counts only."""
    upper = chi2.ppf(0.95, 2 * stat.true_positives + 2) / 2
    rate = min(upper / max(stat.positives, 1), 1.0)
    return math.sqrt(rate * (1 - rate) / max(stat.positives / max(stat.n, 1), 1))


def headline_numbers(evaluation: Evaluation) -> dict[str, Stat]:
    """Every headline number of an evaluation by its name: test accuracy, the strongest attack's TPRs, and
    each attack's AUC and TPRs."""
    numbers: dict[str, Stat] = {"test accuracy": evaluation.test_accuracy,
                                "strongest TPR@0.1%": evaluation.strongest.tpr_at_0_1pct_fpr,
                                "strongest TPR@1%": evaluation.strongest.tpr_at_1pct_fpr}
    for attack, summary in evaluation.attacks.items():
        numbers |= {f"{attack} AUC": summary.auc, f"{attack} TPR@0.1%": summary.tpr_at_0_1pct_fpr,
                    f"{attack} TPR@1%": summary.tpr_at_1pct_fpr}
    return numbers


def headline_stats(committed: Evaluation, rerun: Evaluation, n_test: int) -> list[tuple[str, Stat, Stat, float, float]]:
    """(metric, committed, rerun, resolution, spread floor) for every headline number of one evaluation,
    over the attacks both hold; the resolution and the spread floor (0 but for a TPR) from the rerun's
    counts and ``n_test`` (the checker's)."""
    targets = rerun.test_accuracy.n
    mine = headline_numbers(committed)
    pairs = []
    for metric, stat in headline_numbers(rerun).items():
        if metric not in mine:
            continue  # an attack only the rerun holds: compare_results fails it
        if isinstance(stat, LowFprSummary):
            resolution, floor = EXAMPLES_OF_SLACK / max(stat.positives, 1), sparse_count_spread(stat)
        elif metric == "test accuracy":
            resolution, floor = EXAMPLES_OF_SLACK / max(n_test * targets, 1), 0.0
        else:
            resolution, floor = AUC_RESOLUTION, 0.0
        pairs.append((metric, mine[metric], stat, resolution, floor))
    return pairs


def _missing(label: str, committed: Evaluation, rerun: Evaluation) -> list[Comparison]:
    """A failing row per attack that only one side reports: a document cannot leave out (or invent) one."""
    return [Comparison(label, f"{attack} AUC ({'not in the document' if attack in rerun.attacks else 'not rerun'})",
                       committed.attacks[attack].auc.mean if attack in committed.attacks else math.nan,
                       rerun.attacks[attack].auc.mean if attack in rerun.attacks else math.nan, 0.0)
            for attack in sorted(set(committed.attacks) ^ set(rerun.attacks))]


def _rows(label: str, committed: Evaluation, rerun: Evaluation, n_test: int, case: str,
          pool_se: dict[str, float]) -> list[Comparison]:
    return [Comparison(label, metric, a.mean, b.mean, allowed_change(b, resolution, case, floor, pool_se.get(metric, 0.0)))
            for metric, a, b, resolution, floor in headline_stats(committed, rerun, n_test)] + _missing(label, committed, rerun)


def needs_pool_spread(case: str, comparisons: list[Comparison]) -> bool:
    """Whether the rerun's jackknife (``results/jackknife.py``) could change the verdict: a retrained pool, and some
    number outside that a wider tolerance could take in (not an attack only one side holds)."""
    return case == RETRAINED_POOL and any(not c.ok and math.isfinite(c.committed) and math.isfinite(c.rerun)
                                          for c in comparisons)


def differences(stored: Any, recomputed: Any, where: str, tolerance: float = 0.0) -> list[str]:
    """Every place where two plain-data values (dicts, lists, numbers, strings) differ, one line each;
    floats within ``tolerance`` of each other count as equal."""
    if isinstance(stored, dict) and isinstance(recomputed, dict):
        if stored.keys() != recomputed.keys():
            return [f"{where}: keys {sorted(stored)} differ from recomputed {sorted(recomputed)}"]
        return [d for key in stored for d in differences(stored[key], recomputed[key], f"{where}.{key}", tolerance)]
    if isinstance(stored, list) and isinstance(recomputed, list):
        if len(stored) != len(recomputed):
            return [f"{where}: {len(stored)} entries, recomputed {len(recomputed)}"]
        return [d for i, (a, b) in enumerate(zip(stored, recomputed))
                for d in differences(a, b, f"{where}[{i}]", tolerance)]
    if isinstance(stored, float) or isinstance(recomputed, float):
        if not (isinstance(stored, (int, float)) and isinstance(recomputed, (int, float))
                and math.isclose(stored, recomputed, rel_tol=0.0, abs_tol=tolerance)):
            return [f"{where}: stored {stored!r}, recomputed {recomputed!r}"]
        return []
    return [] if stored == recomputed else [f"{where}: stored {stored!r}, recomputed {recomputed!r}"]


def _exact(label: str, committed: Evaluation, rerun: Evaluation) -> list[Comparison]:
    """In the identical case, the whole evaluation beside its headline means: intervals, counts,
    every target's numbers and the ROC curves, which a bit-identical rerun reproduces exactly."""
    found = differences(committed.model_dump(mode="json"), rerun.model_dump(mode="json"), "")
    return [Comparison(label, f"{found[0].lstrip('.')} (must be identical)", math.nan, math.nan, 0.0)] if found else []


def compare_results(committed: Result, rerun: Result, case: str | None = None,
                    pool_se: PoolSpread | None = None) -> list[Comparison]:
    """Every headline number of the quantized targets and of their full-precision reference, under
    ``case``'s tolerance (by default ``regime``'s); in the identical case every other number too.
    ``pool_se``: the rerun's jackknife standard errors (``results/jackknife.py``), which a retrained
    pool's tolerance takes where they exceed the spread over targets."""
    case = case or regime(committed, rerun)
    label = f"{committed.plan}--{committed.threat_model}"
    pool_se = pool_se or PoolSpread({}, {})
    rows = (_rows(label, committed.quantized, rerun.quantized, rerun.n_test, case, pool_se.quantized)
            + _rows(f"{label} (fp32 ref)", committed.reference, rerun.reference, rerun.n_test, case, pool_se.reference))
    if case == IDENTICAL:
        rows += (_exact(label, committed.quantized, rerun.quantized)
                 + _exact(f"{label} (fp32 ref)", committed.reference, rerun.reference))
    return rows
