"""Boards: per (task, threat model, plan), entries ranked by TPR@0.1%FPR, the Pareto frontier marked."""

from __future__ import annotations

import pandas as pd

from ..submission.schema import REFERENCE_ENTRIES

BOARD_COLUMNS = ["rank", "tied", "entry", "display_name", "reference", "check", "reproduced", "pareto", "plan", "test_accuracy", "test_accuracy_low",
                 "test_accuracy_high", "tpr_at_0_1pct_fpr", "tpr_at_0_1pct_fpr_low", "tpr_at_0_1pct_fpr_high",
                 "true_positives_0_1pct", "positives", "false_positives_0_1pct", "negatives", "tpr_at_1pct_fpr",
                 "tpr_at_1pct_fpr_low", "tpr_at_1pct_fpr_high", "auc", "auc_low", "auc_high", "targets", "task_version"]


# Accuracies and rates are counts over at most ~10^6 examples: values closer than this are the same count
# computed in another order (7637/8000 stored as 0.954625 and 0.9546250000000001), not a difference.
SAME = 9  # decimals compared


def pareto_front(accuracy: pd.Series, leakage: pd.Series) -> pd.Series:
    """True where no other entry is at least as accurate and leaks at most as much, and strictly better in one
    (compared to ``SAME`` decimals, so float noise in the last bit makes no one better)."""
    accuracy, leakage = accuracy.round(SAME), leakage.round(SAME)
    flags = []
    for i in accuracy.index:
        dominated = ((accuracy >= accuracy[i]) & (leakage <= leakage[i])
                     & ((accuracy > accuracy[i]) | (leakage < leakage[i]))).any()
        flags.append(not dominated)
    return pd.Series(flags, index=accuracy.index)


def tied_ranks(low: pd.Series, high: pd.Series, unranked: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Ranks that claim no more than the 95% intervals show.

    An entry's rank is 1 + the number of entries that leak significantly less (whose whole interval lies
    below its own): as in 1, 1, 3, and the same whatever order the rows come in. Overlap is not transitive,
    so two entries can overlap and still rank apart, when a third entry separates from one of them only;
    and a wide interval can rank above a narrow one with a lower mean (no entry is significantly better
    than it). ``unranked`` rows get no rank and rank no one: the references (fp32, rtn), yardsticks rather
    than competitors, and self-reported results, whose numbers nobody recomputed. ``tied`` marks every
    ranked row that shares its rank with another.
    """
    ranked = ~unranked.astype(bool)
    ranks = pd.Series(float("nan"), index=low.index)
    for i in low.index[ranked]:
        ranks[i] = 1 + int((high[ranked] < low[i]).sum())
    tied = ranks.notna() & ranks.duplicated(keep=False)
    return ranks.astype("Int64"), tied


def board(rows: pd.DataFrame, task: str, threat: str, plan: str, attack: str) -> pd.DataFrame:
    """Current results at ``plan`` plus the full-precision reference, ranked (lower TPR@0.1%FPR leaks less)."""
    current = rows[(rows.task == task) & (rows.threat_model == threat) & (rows.attack == attack)]
    # The full-precision row comes from the reference entry only (validate refuses fp32 results elsewhere).
    table = current[(current.plan == plan) | ((current.plan == "fp32") & current.entry.isin(REFERENCE_ENTRIES))].copy()
    if table.empty:
        return table.reindex(columns=BOARD_COLUMNS)
    order = table.assign(_tpr=table.tpr_at_0_1pct_fpr.round(SAME), _acc=table.test_accuracy.round(SAME))
    table = table.loc[order.sort_values(["_tpr", "_acc", "entry"], ascending=[True, False, True]).index]
    checked = table.check != "self-reported"  # shown and marked, but it neither ranks nor bounds the frontier
    table["rank"], table["tied"] = tied_ranks(table.tpr_at_0_1pct_fpr_low, table.tpr_at_0_1pct_fpr_high,
                                              table.reference.astype(bool) | ~checked)
    table["pareto"] = False
    table.loc[checked, "pareto"] = pareto_front(table.test_accuracy[checked], table.tpr_at_0_1pct_fpr[checked])
    return table[BOARD_COLUMNS + ["roc_fpr", "roc_tpr"]].reset_index(drop=True)


def missing_references(table: pd.DataFrame) -> list[str]:
    present = set(table.entry)
    return [name for name in REFERENCE_ENTRIES if name not in present]
