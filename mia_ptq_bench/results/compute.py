"""From membership scores to the result's numbers: per-target metrics, then aggregates.

Pure functions on arrays, shared by the runner (to write results) and by
``validate`` (to recompute them from the saved arrays).
"""

from __future__ import annotations

import numpy as np

from ..metrics import COMPACT_FPR_GRID, AttackMetrics, LowFprPoint, attack_metrics, summarize
from ..metrics.select import Choice
from .schema import (AttackOnTarget, AttackSummary, Evaluation, LowFpr, LowFprSummary, Stat, StrongestOnTarget,
                     StrongestSummary, TargetResult)


def _stat(values: list[float]) -> Stat:
    s = summarize(values)
    return Stat(mean=s.mean, std=s.std, ci_low=s.ci_low, ci_high=s.ci_high, n=s.n)


def _low_fpr(point: LowFprPoint) -> LowFpr:
    return LowFpr(fpr_limit=point.fpr_limit, tpr=point.tpr, fpr=point.fpr, true_positives=point.true_positives,
                  positives=point.positives, false_positives=point.false_positives, negatives=point.negatives)


def _on_target(m: AttackMetrics) -> AttackOnTarget:
    return AttackOnTarget(auc=m.auc, balanced_accuracy=m.balanced_accuracy, tpr_at_0_1pct_fpr=_low_fpr(m.low_fpr[0]),
                          tpr_at_1pct_fpr=_low_fpr(m.low_fpr[1]))


def _low_fpr_summary(points: list[LowFpr]) -> LowFprSummary:
    s = summarize([p.tpr for p in points])
    return LowFprSummary(mean=s.mean, std=s.std, ci_low=s.ci_low, ci_high=s.ci_high, n=s.n,
                         true_positives=sum(p.true_positives for p in points), positives=sum(p.positives for p in points),
                         false_positives=sum(p.false_positives for p in points),
                         negatives=sum(p.negatives for p in points))


def build_evaluation(keep: np.ndarray, targets: np.ndarray, membership: dict[str, np.ndarray],
                     test_predictions: np.ndarray, test_labels: np.ndarray, choices: list[Choice],
                     chosen_membership: np.ndarray) -> Evaluation:
    """keep (M, N) bool; targets (T,); membership[attack] (T, N); test_predictions (T, n_test);
    choices[row] the strategy chosen for each target and chosen_membership (T, N) its scores."""
    per_target, rocs = [], {name: [] for name in membership}
    for row, target in enumerate(targets):
        labels = keep[target]
        attacks = {}
        for name, scores in membership.items():
            metrics = attack_metrics(labels, scores[row])
            attacks[name] = _on_target(metrics)
            rocs[name].append(metrics.roc_tpr)
        accuracy = float(np.mean(test_predictions[row] == test_labels))
        chosen = _on_target(attack_metrics(labels, chosen_membership[row]))
        choice = choices[row]
        strongest = StrongestOnTarget(threat_model=choice.threat_model, attack=choice.attack, estimate=choice.estimate,
                                      tpr_at_0_1pct_fpr=chosen.tpr_at_0_1pct_fpr, tpr_at_1pct_fpr=chosen.tpr_at_1pct_fpr)
        per_target.append(TargetResult(index=int(target), test_accuracy=accuracy, attacks=attacks, strongest=strongest))
    summaries = {}
    for name in membership:
        results = [t.attacks[name] for t in per_target]
        summaries[name] = AttackSummary(
            roc_tpr=[float(x) for x in np.mean(rocs[name], axis=0)],
            auc=_stat([r.auc for r in results]),
            balanced_accuracy=_stat([r.balanced_accuracy for r in results]),
            tpr_at_0_1pct_fpr=_low_fpr_summary([r.tpr_at_0_1pct_fpr for r in results]),
            tpr_at_1pct_fpr=_low_fpr_summary([r.tpr_at_1pct_fpr for r in results]),
        )
    chosen_counts: dict[str, int] = {}
    for t in per_target:
        key = f"{t.strongest.threat_model} / {t.strongest.attack}"
        chosen_counts[key] = chosen_counts.get(key, 0) + 1
    strongest = StrongestSummary(tpr_at_0_1pct_fpr=_low_fpr_summary([t.strongest.tpr_at_0_1pct_fpr for t in per_target]),
                                 tpr_at_1pct_fpr=_low_fpr_summary([t.strongest.tpr_at_1pct_fpr for t in per_target]),
                                 chosen=dict(sorted(chosen_counts.items())))
    return Evaluation(roc_fpr_grid=list(COMPACT_FPR_GRID), test_accuracy=_stat([t.test_accuracy for t in per_target]),
                      attacks=summaries, strongest=strongest, targets=per_target)
