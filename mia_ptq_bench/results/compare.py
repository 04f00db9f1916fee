"""How close a rerun must come to a committed result: the reproducibility contract, as pure functions.

- Same environment (every field of ``Environment`` but the device string equal: package
  versions, Python, platform, torch threads, CPU capability, deterministic flag): the rerun is
  bit-identical, so every number must be equal.
- Another environment: float rounding differs (other vector kernels, another summation order),
  training drifts by a few ulps and a handful of examples change rank. Each headline number
  must then lie within a quarter of the committed 95% interval's half-width of the committed
  value, and never closer than its resolution requires: 5 examples over all targets for a rate
  (TPR, accuracy), 1e-4 for AUC. Measured across CPU capabilities on digits-mlp (AVX-512 vs
  the portable kernels) the largest change was 4 true positives of 10,426 (docs/reproducibility.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from .schema import Environment, Evaluation, LowFprSummary, Result, Stat

INTERVAL_SHARE = 0.25
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


def same_environment(a: Environment, b: Environment) -> bool:
    return a.model_dump(exclude={"device"}) == b.model_dump(exclude={"device"})


def allowed_change(stat: Stat, resolution: float) -> float:
    half_width = max(stat.mean - stat.ci_low, stat.ci_high - stat.mean)
    return max(INTERVAL_SHARE * half_width, resolution)


def _rows(label: str, committed: Evaluation, rerun: Evaluation, n_test: int, exact: bool) -> list[Comparison]:
    targets = committed.test_accuracy.n

    def rate(stat: LowFprSummary) -> float:
        return EXAMPLES_OF_SLACK / max(stat.positives, 1)

    pairs: list[tuple[str, Stat, Stat, float]] = [
        ("test accuracy", committed.test_accuracy, rerun.test_accuracy, EXAMPLES_OF_SLACK / (n_test * targets)),
        ("strongest TPR@0.1%", committed.strongest.tpr_at_0_1pct_fpr, rerun.strongest.tpr_at_0_1pct_fpr,
         rate(committed.strongest.tpr_at_0_1pct_fpr)),
        ("strongest TPR@1%", committed.strongest.tpr_at_1pct_fpr, rerun.strongest.tpr_at_1pct_fpr,
         rate(committed.strongest.tpr_at_1pct_fpr)),
    ]
    for attack, summary in committed.attacks.items():
        other = rerun.attacks[attack]
        pairs += [(f"{attack} AUC", summary.auc, other.auc, AUC_RESOLUTION),
                  (f"{attack} TPR@0.1%", summary.tpr_at_0_1pct_fpr, other.tpr_at_0_1pct_fpr,
                   rate(summary.tpr_at_0_1pct_fpr)),
                  (f"{attack} TPR@1%", summary.tpr_at_1pct_fpr, other.tpr_at_1pct_fpr, rate(summary.tpr_at_1pct_fpr))]
    return [Comparison(label, metric, a.mean, b.mean, 0.0 if exact else allowed_change(a, resolution))
            for metric, a, b, resolution in pairs]


def compare_results(committed: Result, rerun: Result) -> list[Comparison]:
    """Every headline number of the quantized targets and of their full-precision reference."""
    exact = same_environment(committed.environment, rerun.environment)
    label = f"{committed.plan}--{committed.threat_model}"
    return (_rows(label, committed.quantized, rerun.quantized, committed.n_test, exact)
            + _rows(f"{label} (fp32 ref)", committed.reference, rerun.reference, committed.n_test, exact))
