"""How close a rerun must come to a committed result: the reproducibility contract, as pure functions.

The committed document is the submitter's word: how wide a tolerance is comes from what the
checker computed itself (the rerun), and which case applies from the checker's pool, loosened by
the document only where the checker trained that pool itself (then it cannot tell). Three cases (``regime``):

- ``identical``: the same environment (every field of ``Environment`` equal: package versions,
  Python, platform, processor, torch threads, CPU capability, deterministic flag, and the GPU
  for a CUDA run). The rerun is bit-identical, so every number must be equal.
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
  independent means over the targets, sqrt(2) s / sqrt(n) with s the rerun's spread. Measured
  (docs/reproducibility.md): a fashion-mnist-resnet pool retrained on an Intel Xeon moved the
  numbers of 27 results from the AMD EPYC pool's by at most 4.7 of those standard errors, and the
  whole grid's 75 results by at most 5.2 (with the floor below). For a TPR, s is never taken below
  the binomial spread of a target's count at the rerun's pooled rate, read at that rate's 95% upper
  confidence bound (``sparse_count_spread``): at 0.1% FPR a target's TPR is a handful of true
  positives, and 16 such counts estimate their own spread poorly; the bound keeps a rerun whose
  targets mostly score 0 from allowing only the resolution.

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
RETRAINED_SE = 6.0  # standard errors of the difference of two means (measured: at most 5.2 apart)
EXAMPLES_OF_SLACK = 5
AUC_RESOLUTION = 1e-4


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
    if same_environment(committed.environment, rerun.environment):
        return IDENTICAL
    return SAME_POOL if same_pool(committed, rerun) else RETRAINED_POOL


def half_width(stat: Stat) -> float:
    """A 95% interval's half-width (the wider side, where clipping to [0, 1] made it lopsided)."""
    return max(stat.mean - stat.ci_low, stat.ci_high - stat.mean)


def allowed_change(stat: Stat, resolution: float, case: str = SAME_POOL, spread_floor: float = 0.0) -> float:
    """How far the rerun's mean may lie from the committed one, from the rerun's own ``stat`` (computed
    by the checker: nothing the document states widens it): 0 when identical; with the same pool a
    quarter of the interval's half-width; with a retrained pool ``RETRAINED_SE`` standard errors of
    the difference of two independent means over the targets, sqrt(2) s / sqrt(n), s the rerun's
    spread but at least ``spread_floor``; never less than ``resolution``."""
    if case == IDENTICAL:
        return 0.0
    if case == SAME_POOL:
        return max(SAME_POOL_SHARE * half_width(stat), resolution)
    return max(RETRAINED_SE * max(stat.std, spread_floor) * math.sqrt(2 / max(stat.n, 1)), resolution)


def sparse_count_spread(stat: LowFprSummary) -> float:
    """The spread over targets a TPR's counts have at least: the binomial sd sqrt(p (1 - p) / members per
    target), p the rerun's pooled rate (true positives over positives) at its one-sided 95% Poisson upper
    bound, so that a rerun whose targets score 0, 1 or 2 true positives is not taken at its word that
    they hardly vary. From the rerun's counts only."""
    upper = chi2.ppf(0.95, 2 * stat.true_positives + 2) / 2
    rate = min(upper / max(stat.positives, 1), 1.0)
    return math.sqrt(rate * (1 - rate) / max(stat.positives / max(stat.n, 1), 1))


def headline_stats(committed: Evaluation, rerun: Evaluation, n_test: int) -> list[tuple[str, Stat, Stat, float, float]]:
    """(metric, committed, rerun, resolution, spread floor) for every headline number of one evaluation,
    over the attacks both hold; the resolution and the spread floor (0 but for a TPR) from the rerun's
    counts and ``n_test`` (the checker's)."""
    targets = rerun.test_accuracy.n

    def rate(name: str, committed_stat: LowFprSummary, rerun_stat: LowFprSummary):
        return (name, committed_stat, rerun_stat, EXAMPLES_OF_SLACK / max(rerun_stat.positives, 1),
                sparse_count_spread(rerun_stat))

    pairs = [
        ("test accuracy", committed.test_accuracy, rerun.test_accuracy, EXAMPLES_OF_SLACK / max(n_test * targets, 1), 0.0),
        rate("strongest TPR@0.1%", committed.strongest.tpr_at_0_1pct_fpr, rerun.strongest.tpr_at_0_1pct_fpr),
        rate("strongest TPR@1%", committed.strongest.tpr_at_1pct_fpr, rerun.strongest.tpr_at_1pct_fpr),
    ]
    for attack, other in rerun.attacks.items():
        summary = committed.attacks.get(attack)
        if summary is None:
            continue  # compare_results fails it
        pairs += [(f"{attack} AUC", summary.auc, other.auc, AUC_RESOLUTION, 0.0),
                  rate(f"{attack} TPR@0.1%", summary.tpr_at_0_1pct_fpr, other.tpr_at_0_1pct_fpr),
                  rate(f"{attack} TPR@1%", summary.tpr_at_1pct_fpr, other.tpr_at_1pct_fpr)]
    return pairs


def _missing(label: str, committed: Evaluation, rerun: Evaluation) -> list[Comparison]:
    """A failing row per attack that only one side reports: a document cannot leave out (or invent) one."""
    return [Comparison(label, f"{attack} AUC ({'not in the document' if attack in rerun.attacks else 'not rerun'})",
                       committed.attacks[attack].auc.mean if attack in committed.attacks else math.nan,
                       rerun.attacks[attack].auc.mean if attack in rerun.attacks else math.nan, 0.0)
            for attack in sorted(set(committed.attacks) ^ set(rerun.attacks))]


def _rows(label: str, committed: Evaluation, rerun: Evaluation, n_test: int, case: str) -> list[Comparison]:
    return [Comparison(label, metric, a.mean, b.mean, allowed_change(b, resolution, case, floor))
            for metric, a, b, resolution, floor in headline_stats(committed, rerun, n_test)] + _missing(label, committed, rerun)


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


def compare_results(committed: Result, rerun: Result, case: str | None = None) -> list[Comparison]:
    """Every headline number of the quantized targets and of their full-precision reference, under
    ``case``'s tolerance (by default ``regime``'s); in the identical case every other number too."""
    case = case or regime(committed, rerun)
    label = f"{committed.plan}--{committed.threat_model}"
    rows = (_rows(label, committed.quantized, rerun.quantized, rerun.n_test, case)
            + _rows(f"{label} (fp32 ref)", committed.reference, rerun.reference, rerun.n_test, case))
    if case == IDENTICAL:
        rows += (_exact(label, committed.quantized, rerun.quantized)
                 + _exact(f"{label} (fp32 ref)", committed.reference, rerun.reference))
    return rows
