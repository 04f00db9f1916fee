"""The task spec: everything that defines an experiment, validated strictly.

A task's identity is its id plus the sha256 of its canonical content (defaults
filled in, keys sorted), so a result names exactly the task it was run on. The
pool depends on a subset of the spec only (data, model, training, membership,
queries); its cache key is the hash of that subset, so adding a precision plan to
a task does not retrain the pool.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..atomic import content_hash
from ..errors import PlanError
from .plans import PrecisionPlan

POOL_FIELDS = ("dataset", "model", "training", "membership", "queries")
# Top-level fields added after tasks were first published: while unset they are left out of the
# canonical content, so adding an optional feature does not make every existing result stale.
EXTENSIONS = ("hub", "rmia")


# Attacks, queries and threat models are registry names: their registries are the one source of
# truth, checked when a task is loaded for use (runner.check_task), not listed again here.
RegistryName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(Strict):
    name: str = Field(description="dataset registry name: digits, fashion-mnist, cifar10, cifar100, tinyimagenet")
    pool_size: int | None = Field(None, gt=0, description="use a seeded subset of the training split as the pool")
    test_size: int | None = Field(None, gt=0, description="use a seeded subset of the test split")
    image_size: int | None = Field(None, gt=0, description="resize images to this side length (small test tasks)")
    subset_seed: int = 0


class ModelSpec(Strict):
    arch: str = Field(description="model registry name: mlp, cnn, resnet18, resnet50, densenet121")
    width: float = Field(1.0, gt=0, description="channel/hidden-width multiplier")
    options: dict[str, Any] = Field(default_factory=dict, description="architecture-specific options")


class AugmentSpec(Strict):
    crop_padding: int = Field(0, ge=0, description="random crop of the original size after zero padding")
    hflip: bool = False


class TrainingSpec(Strict):
    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    augment: AugmentSpec = AugmentSpec()
    seed: int = 0


class MembershipSpec(Strict):
    n_models: int = Field(64, ge=2)
    pkeep: float = Field(0.5, gt=0, lt=1)
    seed: int = 0


class TargetsSpec(Strict):
    count: int = Field(ge=1, description="pool models 0..count-1 play the victim, one at a time")


class LiraSpec(Strict):
    offline_test: Literal["one-sided", "two-sided"] = Field(
        "one-sided", description="one-sided P[Z < s] under OUT (LiRA paper) or the reference code's -log N(s; out)"
    )
    fixed_variance_out: Literal["out", "in"] = Field(
        "out", description="'in' reproduces the reference code's quirk of using the IN std for OUT too"
    )
    equalize_counts: bool = Field(False, description="truncate IN and OUT shadows to the same count (reference quirk)")


class RmiaSpec(Strict):
    offline_a: float = Field(0.3, ge=0, le=1, description="offline RMIA's linear approximation of the IN side: "
                                                          "Pr(x) = (1+a)/2 mean_OUT + (1-a)/2")
    gamma: float = Field(1.0, ge=1, description="x must beat a population sample's likelihood ratio by this factor")


# Measured on digits-mlp (benchmarks/results/adaptive_shadows_*.txt): with 31 quantized shadows the adaptive
# attacker's TPR@0.1%FPR equals that with all 63 (RMIA, fixed-variance LiRA), with 15 it keeps ~90%.
DEFAULT_ADAPTIVE_SHADOWS = 31


class AdaptiveSpec(Strict):
    shadows: int | None = Field(
        None, ge=1, description="quantized shadows per target for attackers that quantize theirs: pool models "
                                "0..shadows are quantized and each target is attacked with the others; "
                                f"default {DEFAULT_ADAPTIVE_SHADOWS} (every other pool model in smaller pools)")


class StrongestSpec(Strict):
    attacks: list[RegistryName] | None = Field(None, description="the attacks that count (default: all the task's)")
    pseudo_targets: int = Field(8, ge=1, description="shadow models the attacker attacks itself to choose")
    examples: int = Field(2000, ge=100, description="pool examples (a fixed subset) the pseudo-targets are attacked on")


class CalibrationSpec(Strict):
    source: Literal["members", "heldout"] = "members"
    size: int = Field(1024, gt=0)
    seed: int = 0


class HubSpec(Strict):
    repo: str = Field(pattern=r"^[\w.-]+/[\w.-]+$", description="Hub model repository holding the pool")
    revision: str | None = Field(None, description="commit hash (or branch/tag) to pin; results record the commit")




class TaskSpec(Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    version: int = Field(ge=1)
    description: str = ""
    dataset: DatasetSpec
    model: ModelSpec
    training: TrainingSpec
    membership: MembershipSpec = MembershipSpec()
    targets: TargetsSpec
    queries: list[RegistryName] = Field(default_factory=lambda: ["identity", "hflip"], min_length=1)
    attacks: list[RegistryName] = Field(default_factory=lambda: ["lira-online"], min_length=1)
    lira: LiraSpec = LiraSpec()
    rmia: RmiaSpec | None = Field(None, description="RMIA's options (defaults when absent)")
    plans: list[str] = Field(min_length=1)
    calibration: CalibrationSpec = CalibrationSpec()
    threat_models: list[RegistryName] = Field(default_factory=lambda: ["oblivious"], min_length=1)
    adaptive: AdaptiveSpec = AdaptiveSpec()
    strongest: StrongestSpec = StrongestSpec()
    hub: HubSpec | None = Field(None, description="pull the pool from the Hugging Face Hub instead of training it")

    @field_validator("plans")
    @classmethod
    def _plans_parse(cls, plans: list[str]) -> list[str]:
        try:
            canonical = [str(PrecisionPlan.parse(plan)) for plan in plans]
        except PlanError as exc:
            raise ValueError(str(exc)) from None
        if "fp32" in canonical:
            raise ValueError("'fp32' is the reference every result carries; list only quantized plans")
        return _unique(canonical, "plan")

    @field_validator("queries", "attacks", "threat_models")
    @classmethod
    def _no_duplicates(cls, values: list[str]) -> list[str]:
        return _unique(values, "entry")

    @model_validator(mode="after")
    def _targets_fit_pool(self) -> TaskSpec:
        if self.targets.count > self.membership.n_models:
            raise ValueError(
                f"targets.count ({self.targets.count}) exceeds membership.n_models ({self.membership.n_models})"
            )
        shadows = self.adaptive.shadows
        if shadows is not None and not self.targets.count - 1 <= shadows <= self.membership.n_models - 1:
            raise ValueError(f"adaptive.shadows ({shadows}) must lie between targets.count - 1 "
                             f"({self.targets.count - 1}) and membership.n_models - 1 ({self.membership.n_models - 1}): "
                             "every target's quantized shadows are the other quantized models")
        unknown = set(self.strongest.attacks or []) - set(self.attacks)
        if unknown:
            raise ValueError(f"strongest.attacks: {sorted(unknown)} are not among the task's attacks")
        return self

    @property
    def quantized_shadow_models(self) -> list[int]:
        """The pool models an attacker that quantizes its shadows quantizes (targets among them)."""
        shadows = self.adaptive.shadows
        if shadows is None:
            shadows = max(min(DEFAULT_ADAPTIVE_SHADOWS, self.membership.n_models - 1), self.targets.count - 1)
        return list(range(shadows + 1))

    def canonical(self) -> dict:
        dumped = self.model_dump(mode="json")
        return {k: v for k, v in dumped.items() if not (k in EXTENSIONS and v is None)}

    @property
    def hash(self) -> str:
        return content_hash(self.canonical())

    @property
    def pool_hash(self) -> str:
        dumped = self.model_dump(mode="json")
        return content_hash({key: dumped[key] for key in POOL_FIELDS})

    @property
    def rmia_options(self) -> RmiaSpec:
        return self.rmia or RmiaSpec()


def _unique(values: list[str], what: str) -> list[str]:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"duplicate {what} {value!r}")
        seen.add(value)
    return values
