"""Attack metrics from membership scores and true membership, as pure functions.

TPR at x FPR is read at the last ROC point whose FPR is strictly below x (LiRA's
reference code); with it we report the true positives and false positives it
rests on, because at 0.1% FPR a few hundred negatives leave almost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn import config_context
from sklearn.metrics import auc as area_under, roc_curve

FPR_LEVELS = (0.001, 0.01)
COMPACT_FPR_GRID = tuple(float(x) for x in np.logspace(-5, 0, 51))


@dataclass(frozen=True)
class LowFprPoint:
    fpr_limit: float
    tpr: float
    fpr: float
    true_positives: int
    positives: int
    false_positives: int
    negatives: int


@dataclass(frozen=True)
class AttackMetrics:
    auc: float
    balanced_accuracy: float
    low_fpr: tuple[LowFprPoint, ...]
    roc_fpr: tuple[float, ...]  # the compact grid
    roc_tpr: tuple[float, ...]  # best TPR at FPR <= each grid value


def roc(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        raise ValueError("membership labels need both members and non-members")
    # The inputs are checked above and by the callers; scikit-learn's own argument checks cost more
    # than the curve itself on the small arrays the strongest-attack choice passes thousands of times.
    with config_context(skip_parameter_validation=True):
        fpr, tpr, _ = roc_curve(labels, np.asarray(scores, dtype=np.float64), drop_intermediate=False)
    return fpr, tpr


def tpr_below(fpr: np.ndarray, tpr: np.ndarray, limit: float) -> tuple[float, float]:
    """(TPR, FPR) at the last ROC point with FPR < limit; the curve starts at (0, 0)."""
    index = np.flatnonzero(fpr < limit)[-1]
    return float(tpr[index]), float(fpr[index])


def attack_metrics(labels: np.ndarray, scores: np.ndarray, levels: tuple[float, ...] = FPR_LEVELS) -> AttackMetrics:
    labels = np.asarray(labels, dtype=bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    fpr, tpr = roc(labels, scores)
    points = []
    for level in levels:
        t, f = tpr_below(fpr, tpr, level)
        points.append(LowFprPoint(level, t, f, int(round(t * positives)), positives, int(round(f * negatives)), negatives))
    # Step curve on a log grid: small enough to keep in every result, exact at its grid points.
    grid = np.asarray(COMPACT_FPR_GRID)
    last = np.searchsorted(fpr, grid, side="right") - 1
    compact = np.maximum.accumulate(tpr)[last]
    with config_context(skip_parameter_validation=True):
        area = float(area_under(fpr, tpr))
    return AttackMetrics(
        auc=area,
        balanced_accuracy=float(np.max(1.0 - (fpr + (1.0 - tpr)) / 2.0)),
        low_fpr=tuple(points),
        roc_fpr=COMPACT_FPR_GRID,
        roc_tpr=tuple(float(x) for x in compact),
    )
