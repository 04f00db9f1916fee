from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import independent
from mia_ptq_bench.metrics import attack_metrics, summarize, tpr_below, roc


def test_tpr_at_fpr_matches_hand_computed_roc() -> None:
    # 4 members, 6 non-members. Sorted by score: M M N M N N M N N N
    labels = np.array([1, 1, 0, 1, 0, 0, 1, 0, 0, 0], dtype=bool)
    scores = np.array([10, 9, 8, 7, 6, 5, 4, 3, 2, 1], dtype=float)
    fpr, tpr = roc(labels, scores)
    # before any non-member is passed: TPR 2/4 at FPR 0
    assert tpr_below(fpr, tpr, 1 / 6) == (0.5, 0.0)
    # FPR strictly below 2/6: last point is (1/6, 3/4)
    assert tpr_below(fpr, tpr, 2 / 6) == (0.75, pytest.approx(1 / 6))
    assert tpr_below(fpr, tpr, 2 / 6 + 1e-9)[0] == 0.75
    assert tpr_below(fpr, tpr, 3 / 6 + 1e-9)[0] == 1.0
    m = attack_metrics(labels, scores, levels=(0.1, 0.2))
    assert m.low_fpr[0].tpr == 0.5 and m.low_fpr[0].true_positives == 2 and m.low_fpr[0].false_positives == 0
    assert m.low_fpr[1].tpr == 0.75 and m.low_fpr[1].false_positives == 1 and m.low_fpr[1].negatives == 6
    assert m.auc == pytest.approx(roc_auc_score(labels, scores))


def test_ties_are_one_threshold() -> None:
    labels = np.array([1, 0, 1, 0], dtype=bool)
    scores = np.array([1.0, 1.0, 0.0, 0.0])
    m = attack_metrics(labels, scores, levels=(0.4, 0.6))
    assert m.low_fpr[0].tpr == 0.0  # the tie moves TPR and FPR together to 0.5
    assert m.low_fpr[1].tpr == 0.5
    assert m.auc == pytest.approx(0.5)


def test_metrics_agree_with_independent_roc() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(3000) < 0.5
    scores = rng.normal(0, 1, 3000) + 0.7 * labels
    scores[:50] = np.round(scores[:50])  # some ties
    m = attack_metrics(labels, scores)
    assert m.auc == pytest.approx(independent.auc(labels, scores), abs=1e-12)
    for point in m.low_fpr:
        assert point.tpr == pytest.approx(independent.tpr_at(labels, scores, point.fpr_limit), abs=1e-12)
    fpr, tpr = independent.roc_points(labels, scores)
    assert m.balanced_accuracy == pytest.approx(np.max(1 - (fpr + 1 - tpr) / 2), abs=1e-12)


def test_compact_roc_is_a_monotone_step_curve_below_the_exact_one() -> None:
    rng = np.random.default_rng(2)
    labels = rng.random(2000) < 0.5
    scores = rng.normal(0, 1, 2000) + labels
    m = attack_metrics(labels, scores)
    assert np.all(np.diff(m.roc_tpr) >= 0) and m.roc_tpr[-1] == 1.0
    for f, t in zip(m.roc_fpr, m.roc_tpr):
        assert t == pytest.approx(independent.tpr_at(labels, scores, f + 1e-15), abs=1e-12)


def test_compact_roc_reads_tpr_at_fpr_at_most_each_grid_value_by_hand() -> None:
    # Sorted by score: M N M N M. ROC points (FPR, TPR): (0, 0), (0, 1/3), (1/2, 1/3), (1/2, 2/3), (1, 2/3), (1, 1).
    labels = np.array([1, 0, 1, 0, 1], dtype=bool)
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    m = attack_metrics(labels, scores)
    assert m.roc_fpr[-1] == 1.0 and len(m.roc_fpr) == 51  # the grid ends exactly where the last FPR lands
    assert m.roc_tpr[-1] == 1.0  # FPR <= 1 includes the point (1, 1), not only (1, 2/3)
    for f, t in zip(m.roc_fpr[:-1], m.roc_tpr[:-1]):
        assert abs(f - 0.5) > 1e-3  # no grid value within rounding of the FPR of 1/2 (the nearest is 10**-0.3)
        assert t == pytest.approx(1 / 3 if f < 0.5 else 2 / 3, abs=1e-15), f


def test_one_sided_labels_are_refused() -> None:
    with pytest.raises(ValueError, match="both members and non-members"):
        attack_metrics(np.ones(5, dtype=bool), np.arange(5.0))


def test_summary_interval() -> None:
    values = [0.2, 0.25, 0.3, 0.22, 0.28]
    s = summarize(values)
    low, high = independent.t_interval(values)
    assert (s.mean, s.n) == (pytest.approx(0.25), 5)
    assert s.std == pytest.approx(np.std(values, ddof=1))
    assert (s.ci_low, s.ci_high) == (pytest.approx(low), pytest.approx(high))
    clipped = summarize([0.0, 0.0, 0.01])
    assert clipped.ci_low == 0.0 and clipped.ci_high > 0.01
    single = summarize([0.4])
    assert (single.std, single.ci_low, single.ci_high) == (0.0, 0.4, 0.4)
