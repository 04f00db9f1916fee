"""Metrics on membership scores: ROC, TPR at low FPR, AUC, balanced accuracy; aggregation over targets."""

from .aggregate import Summary, summarize
from .roc import COMPACT_FPR_GRID, FPR_LEVELS, AttackMetrics, LowFprPoint, attack_metrics, roc, tpr_below

__all__ = ["COMPACT_FPR_GRID", "FPR_LEVELS", "AttackMetrics", "LowFprPoint", "Summary", "attack_metrics", "roc",
           "summarize", "tpr_below"]
