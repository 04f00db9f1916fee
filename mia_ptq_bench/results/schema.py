"""The result document: one per (task, quantizer, plan, threat model).

``mptq-bench schema`` prints its JSON Schema. The arrays that every number can be
recomputed from sit beside it in an .npz file (see docs/results-format.md) whose
sha256 the document records.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from ..spec.audit import LayerAudit

SCHEMA_VERSION = 2


class Strict(BaseModel):
    # Every number of a result is finite: JSON's Infinity or NaN in a document is refused on reading.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# Every number a result reports is a rate, an accuracy or an AUC: a fraction. A document that claims
# otherwise is refused on reading, before anything (the site's plots among them) computes with it.
Fraction = Annotated[float, Field(ge=0, le=1)]
# Counts of examples: exact as floats (the site divides them), far beyond any pool.
Count = Annotated[int, Field(ge=0, le=2**53)]
# The ROC is given on a fixed log-spaced grid (51 points); a document cannot make every page carry more.
ROC_POINTS = 1000


class Stat(Strict):
    mean: Fraction
    std: float = Field(ge=0, le=1, description="sample standard deviation over targets (ddof=1)")
    ci_low: Fraction = Field(description="95% Student-t interval over targets, clipped to [0, 1]")
    ci_high: Fraction
    n: int = Field(ge=1, le=2**53)

    @model_validator(mode="after")
    def _interval_holds_the_mean(self) -> Stat:
        if not self.ci_low <= self.mean <= self.ci_high:
            raise ValueError(f"the interval [{self.ci_low}, {self.ci_high}] does not hold the mean {self.mean}")
        return self


class LowFpr(Strict):
    fpr_limit: Fraction = Field(description="TPR is read at the last ROC point with FPR strictly below this")
    tpr: Fraction
    fpr: Fraction = Field(description="the FPR of that ROC point")
    true_positives: Count
    positives: Count
    false_positives: Count
    negatives: Count

    @model_validator(mode="after")
    def _counts_within_their_totals(self) -> LowFpr:
        return _counts_checked(self)


class AttackOnTarget(Strict):
    auc: Fraction
    balanced_accuracy: Fraction
    tpr_at_0_1pct_fpr: LowFpr
    tpr_at_1pct_fpr: LowFpr


class StrongestOnTarget(Strict):
    """The strategy the attacker chose for this target on its own shadows alone, and how it fared."""

    threat_model: str = Field(description="whose shadows: a threat model no better informed than the result's")
    attack: str
    estimate: Fraction = Field(description="TPR@0.1%FPR the attacker measured on its pseudo-targets (one ROC)")
    tpr_at_0_1pct_fpr: LowFpr
    tpr_at_1pct_fpr: LowFpr


class TargetResult(Strict):
    index: int = Field(description="the pool model that played the victim")
    test_accuracy: Fraction
    attacks: dict[str, AttackOnTarget]
    strongest: StrongestOnTarget


class LowFprSummary(Stat):
    true_positives: Count = Field(description="summed over targets")
    positives: Count
    false_positives: Count
    negatives: Count

    @model_validator(mode="after")
    def _counts_within_their_totals(self) -> LowFprSummary:
        return _counts_checked(self)


def _counts_checked(counts: LowFpr | LowFprSummary) -> LowFpr | LowFprSummary:
    """A rate's counts as an evaluation gives them: no more hits than there are examples to hit."""
    if counts.true_positives > counts.positives or counts.false_positives > counts.negatives:
        raise ValueError("more true (false) positives than positives (negatives)")
    return counts


class AttackSummary(Strict):
    auc: Stat
    balanced_accuracy: Stat
    tpr_at_0_1pct_fpr: LowFprSummary
    tpr_at_1pct_fpr: LowFprSummary
    roc_tpr: list[Fraction] = Field(max_length=ROC_POINTS,
                                    description="mean over targets of the best TPR at FPR <= each value of roc_fpr_grid")


class StrongestSummary(Strict):
    tpr_at_0_1pct_fpr: LowFprSummary
    tpr_at_1pct_fpr: LowFprSummary
    chosen: dict[str, Count] = Field(description="'threat model / attack' -> how many targets it was chosen for")


class Evaluation(Strict):
    roc_fpr_grid: list[Fraction] = Field(max_length=ROC_POINTS, description="log-spaced FPR values at which roc_tpr is given")
    test_accuracy: Stat
    attacks: dict[str, AttackSummary]
    strongest: StrongestSummary = Field(description="each target under the strategy chosen on shadows alone")
    targets: list[TargetResult]

    @model_validator(mode="after")
    def _one_roc_grid(self) -> Evaluation:
        for name, attack in self.attacks.items():
            if len(attack.roc_tpr) != len(self.roc_fpr_grid):
                raise ValueError(f"attacks.{name}.roc_tpr has {len(attack.roc_tpr)} values, roc_fpr_grid "
                                 f"{len(self.roc_fpr_grid)}")
        return self


class TaskRef(Strict):
    id: str
    version: int
    hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    pool_hash: str = Field(pattern=r"^[0-9a-f]{64}$")


class QuantizerRef(Strict):
    name: str
    version: str
    config: dict
    config_hash: str = Field(pattern=r"^[0-9a-f]{64}$")


class PoolSourceRef(Strict):
    repo: str
    revision: str = Field(description="the Hub commit the pool was pulled at")

    @classmethod
    def of(cls, source) -> PoolSourceRef | None:
        """From a pool's record of where it was pulled (``pool.hub.pool_source``), or None for a pool trained here."""
        return None if source is None else cls(repo=source.repo, revision=source.revision)


class ArraysRef(Strict):
    file: str = Field(description="file name of the .npz beside this document")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class EvidenceRef(Strict):
    file: str = Field(description="file name of the .safetensors beside this document: the quantized weights")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    models: list[int] = Field(description="the pool models whose quantized weights it holds")


# A package name or version, a torch setting's name or value: short words, a few dozen of them.
Label = Annotated[str, StringConstraints(max_length=128)]
SETTINGS_CAP = 64


class Environment(Strict):
    """Where a result was computed: a rerun with all of these equal reproduces it bit for bit."""

    package_version: str
    python: str
    platform: str
    processor: str | None = Field(None, description="the CPU's model name; results written before it was recorded "
                                                    "lack it, and no rerun counts as their environment")
    device: str
    packages: dict[Label, Label] = Field(max_length=SETTINGS_CAP)
    torch_threads: int = Field(description="torch.get_num_threads(): the float summation order can depend on it")
    quantize_workers: int = Field(1, ge=1, description="processes the models were quantized and scored in, each with "
                                                       "torch_threads // quantize_workers threads; 1 (the result's own "
                                                       "process) in results written before it was recorded")
    cpu_capability: str = Field(description="torch.backends.cpu.get_cpu_capability(): the vector kernels used")
    deterministic_algorithms: bool = Field(description="torch.are_deterministic_algorithms_enabled()")
    torch_settings: dict[Label, Label | bool] | None = Field(
        None, max_length=SETTINGS_CAP,
        description="torch settings that can change float results (default dtype, deterministic algorithms again, "
                    "float32 precision per backend, cuDNN and oneDNN switches, flushing denormals), under which the run quantized and "
                    "scored, as its worker processes were handed them; results written before they were recorded "
                    "lack them, and no rerun counts as their environment")


class Result(Strict):
    schema_version: Literal[2] = SCHEMA_VERSION
    task: TaskRef
    quantizer: QuantizerRef
    plan: str
    threat_model: str = Field(description="a registered threat model: oblivious, adaptive-rtn, adaptive")
    shadow_models: list[int] = Field(description="the pool models the attacker's shadows are (each target's are "
                                                 "these minus itself)")
    pool_source: PoolSourceRef | None = Field(None, description="set when the pool was pulled from the Hub")
    pool_digest: str | None = Field(None, pattern=r"^[0-9a-f]{64}$",
                                    description="sha256 over the pool models' weight and score files' sha256: equal "
                                                "only for the very same trained pool (absent in older results)")
    pool_arithmetic: Literal["float32", "bfloat16-autocast", "mixed"] | None = Field(
        None, description="how the pool's models were trained: float32, under bfloat16 autocast (evaluate --amp; "
                          "by default on a CUDA GPU with native bfloat16), or mixed (a build resumed in the other); "
                          "absent in older results and where a model's record does not say")
    n_models: int = Field(ge=1)
    n_examples: int = Field(ge=1)
    n_test: int = Field(ge=1, description="test images behind test accuracy (held-out calibration images excluded)")
    quantized: Evaluation = Field(description="the targets after quantization with this plan")
    reference: Evaluation = Field(description="the same targets at full precision, same attacks")
    audit: list[LayerAudit] = Field(description="per layer, the worst channel over all audited models")
    arrays: ArraysRef
    evidence: EvidenceRef | None = Field(None, description="the quantized weights every number can be recomputed "
                                                           "from (none for the full-precision reference)")
    environment: Environment
    started_at: datetime
    finished_at: datetime
    seconds: float
