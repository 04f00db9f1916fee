"""Rendering for the terminal: rich progress bars and the results table."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .results.compare import IDENTICAL, RETRAINED_POOL, SAME_POOL
from .results.schema import Evaluation, Result, Stat


class RichProgress:
    """The library's Progress protocol on rich progress bars."""

    def __init__(self, console: Console) -> None:
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             console=console, transient=False)
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> RichProgress:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def start(self, key: str, description: str, total: int) -> None:
        self.tasks[key] = self.bars.add_task(escape(description), total=total)  # names a user's quantizer
        if total == 0:  # all cached: done now, so its clock stops at 0:00 instead of running with later stages
            self.bars.update(self.tasks[key], completed=0)

    def advance(self, key: str, amount: int = 1) -> None:
        self.bars.advance(self.tasks[key], amount)

    def log(self, message: str) -> None:
        self.bars.console.print(message, soft_wrap=True, markup=False, highlight=False)


def _ci(stat: Stat, scale: float = 100.0, digits: int = 2) -> str:
    """``mean±h``: h is the 95% interval's half-width (the larger side, where clipping at 0 or 1 bit)."""
    half = max(stat.mean - stat.ci_low, stat.ci_high - stat.mean)
    return f"{scale * stat.mean:.{digits}f}±{scale * half:.{digits}f}"


def _label(result: Result, many_threats: bool) -> str:
    return escape(f"{result.plan} {result.threat_model}" if many_threats else result.plan)


def _row(label: str, evaluation: Evaluation, attack: str) -> list[str]:
    summary = evaluation.attacks[attack]
    low = summary.tpr_at_0_1pct_fpr
    return [label, _ci(evaluation.test_accuracy), _ci(low), f"{low.true_positives}/{low.positives}",
            _ci(summary.tpr_at_1pct_fpr), _ci(summary.auc, scale=1.0, digits=3)]


def results_table(results: list[Result], attack: str) -> Table:
    """One row for the full-precision reference, then one per plan (and threat model)."""
    first = results[0]
    low = first.reference.attacks[attack].tpr_at_0_1pct_fpr
    n_targets = low.n
    per_target_negatives = low.negatives // n_targets
    allowed = max(0, -(-per_target_negatives // 1000) - 1)  # FP count strictly below 0.1% of the negatives
    many_threats = len({r.threat_model for r in results}) > 1
    table = Table(title=escape(f"{first.task.id} · {first.quantizer.name} · {attack} · mean±95% CI over {n_targets} targets"),
                  caption=f"TPR@x%: true-positive rate (%) at x% false-positive rate. At 0.1%, each target has {per_target_negatives} non-members, so that point allows "
                          f"{allowed} false positive(s); TP/P sums true positives over targets.",
                  title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=0)
    # the box's one-space column divider only: the widest row (w1.58-last8 adaptive-rtn) then fits an 80-column terminal
    for header in ("model", "test acc %", "TPR@.1% %", "TP/P", "TPR@1% %", "AUC"):
        table.add_column(header, justify="left" if header == "model" else "right", no_wrap=True)
    table.add_row(*_row("fp32 (ref)", first.reference, attack), style="dim")
    for result in results:
        if result.plan != "fp32":
            table.add_row(*_row(_label(result, many_threats), result.quantized, attack))
    return table


def attacks_table(results: list[Result]) -> Table:
    """Mean AUC of every attack the task lists: reference and each plan."""
    first = results[0]
    many_threats = len({r.threat_model for r in results}) > 1
    attacks = list(first.reference.attacks)
    table = Table(title="AUC by attack (mean over targets)", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  padding=0)
    table.add_column("model", no_wrap=True)
    for attack in attacks:  # headers on two lines ("online" over "fixed"): seven attacks fit 80 columns
        table.add_column(escape(attack.removeprefix("lira-").replace("-", "\n", 1)), justify="right", no_wrap=True)
    table.add_row("fp32 (ref)", *[f"{first.reference.attacks[a].auc.mean:.3f}" for a in attacks], style="dim")
    for result in results:
        if result.plan != "fp32":
            table.add_row(_label(result, many_threats), *[f"{result.quantized.attacks[a].auc.mean:.3f}" for a in attacks])
    return table


REGIME_MEANING = {
    IDENTICAL: "the same environment and pool: the rerun must be bit-identical (tolerance 0)",
    SAME_POOL: "another environment, the same pool: within 1/4 of the 95% interval",
    RETRAINED_POOL: "the pool was trained here and nothing trusted says the result used it (a new draw "
                      "of the training noise): within 6 standard errors of the difference of two draws, "
                      "the standard error from the spread over targets, or, for a result with a number outside "
                      "that, the larger of it and a jackknife over the pool's models; "
                      "a pool pulled from the task's Hub repository gets the closer check",
}


def reproduction_caption(outcomes) -> str:
    """What each tolerance in the table means, one line per case that occurred (docs/reproducibility.md)."""
    cases = dict.fromkeys(o.regime for o in outcomes)
    return "\n".join(f"{sum(o.regime == case for o in outcomes)} result(s): {REGIME_MEANING[case]}" for case in cases) \
        + "\n(docs/reproducibility.md)"


def reproduction_table(outcomes, show: str = "headline") -> Table:
    """Per result and metric: committed, rerun, difference, tolerance; ``show`` failed, headline or all rows.

    Fits an 80-column terminal: the result's plan and threat model, and the metric's attack and measure,
    each on two lines; one-space dividers."""
    table = Table(title="reproduction", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=0,
                  caption=reproduction_caption(outcomes),
                  caption_justify="left")
    for header in ("result", "metric", "committed", "rerun", "|Δ|", "tolerance", ""):
        table.add_column(header, justify="left" if header in ("result", "metric", "") else "right",
                         no_wrap=header not in ("result", "metric"))
    for outcome in outcomes:
        for c in outcome.comparisons:
            headline = c.metric in ("test accuracy", "strongest TPR@0.1%", "lira-online TPR@0.1%")
            if show == "all" or (show == "headline" and headline) or not c.ok:
                table.add_row(escape(c.result.replace("--", "\n")), escape(c.metric.replace(" TPR", "\nTPR").replace(" AUC", "\nAUC")), f"{c.committed:.6f}", f"{c.rerun:.6f}",
                              f"{abs(c.rerun - c.committed):.2e}", f"{c.tolerance:.2e}",
                              "ok" if c.ok else "[bold red]OUTSIDE[/]")
    return table
