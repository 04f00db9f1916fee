"""The task spec: everything that defines an experiment, validated strictly.

A task's identity is its id plus the sha256 of its canonical content (defaults
filled in, keys sorted), so a result names exactly the task it was run on. The
pool depends on a subset of the spec only (data, model, training, membership,
queries); its cache key is the hash of that subset, so adding a precision plan to
a task does not retrain the pool.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..atomic import content_hash
from ..errors import PlanError
from ..limits import plain_data_problem
from .plans import PrecisionPlan

POOL_FIELDS = ("dataset", "model", "training", "membership", "queries")
# Top-level fields added after tasks were first published: while unset they are left out of the
# canonical content, so adding an optional feature does not make every existing result stale.
EXTENSIONS = ("hub", "rmia")


# Attacks, queries and threat models are registry names: their registries are the one source of
# truth, checked when a task is loaded for use (runner.check_task), not listed again here.
NAME_PATTERN, NAME_LENGTH = r"^[a-z0-9][a-z0-9.-]*$", 64  # registry names and task ids: file-name safe
RegistryName = Annotated[str, Field(pattern=NAME_PATTERN, max_length=NAME_LENGTH)]
PlanText = Annotated[str, Field(max_length=32)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Ranges: every number a task holds is bounded, so a typo or a hostile file fails at validation instead of
# hanging, exhausting memory or silently giving meaningless numbers. Integers and booleans are strict: YAML's
# `epochs: true` or `epochs: 2.5` is refused, not read as 1 or 2. Floats must be finite (`width: .inf`).
def Int(ge: int, le: int, **kw: Any) -> Any:  # noqa: N802  (reads as a type in the fields below)
    return Field(strict=True, ge=ge, le=le, **kw)


def Float(**kw: Any) -> Any:  # noqa: N802
    return Field(strict=True, allow_inf_nan=False, **kw)


SEED_MAX = 2**32 - 1  # numpy's RandomState takes seeds in [0, 2**32)
Seed = Annotated[int, Field(0, strict=True, ge=0, le=SEED_MAX, description="seed in [0, 2**32)")]
Flag = Annotated[bool, Field(strict=True)]
MAX_MODELS = 1024
MAX_EXAMPLES = 10_000_000  # a pool or test split
MAX_OPTIONS_BYTES = 4096


class DatasetSpec(Strict):
    name: str = Field(max_length=64, description="dataset registry name: digits, fashion-mnist, cifar10, cifar100, tinyimagenet")
    pool_size: int | None = Int(1, MAX_EXAMPLES, default=None, description="use a seeded subset of the training split as the pool")
    test_size: int | None = Int(1, MAX_EXAMPLES, default=None, description="use a seeded subset of the test split")
    image_size: int | None = Int(4, 512, default=None, description="resize images to this side length (small test tasks)")
    subset_seed: Seed = 0


class ModelSpec(Strict):
    arch: str = Field(max_length=64, description="model registry name: mlp, cnn, resnet18, resnet50, densenet121")
    width: float = Float(default=1.0, gt=0, le=64, description="channel/hidden-width multiplier")
    options: dict[str, Any] = Field(default_factory=dict, max_length=32, description="architecture-specific options "
                                    "(each model checks its own; plain data, at most 4 KiB as JSON)")

    @field_validator("options")
    @classmethod
    def _plain_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        problem = plain_data_problem(options, max_depth=4)
        if problem:
            raise ValueError(problem)
        if len(json.dumps(options)) > MAX_OPTIONS_BYTES:
            raise ValueError(f"more than {MAX_OPTIONS_BYTES} bytes as JSON")
        return options


class AugmentSpec(Strict):
    crop_padding: int = Int(0, 64, default=0, description="random crop of the original size after zero padding")
    hflip: Flag = False


class TrainingSpec(Strict):
    epochs: int = Int(1, 10_000)
    batch_size: int = Int(1, 65_536)
    lr: float = Float(gt=0, le=100)
    momentum: float = Float(default=0.9, ge=0, lt=1)
    weight_decay: float = Float(default=5e-4, ge=0, le=1)
    schedule: Literal["cosine", "constant"] = "cosine"
    augment: AugmentSpec = AugmentSpec()
    seed: Seed = 0


class MembershipSpec(Strict):
    n_models: int = Int(8, MAX_MODELS, default=64, description="pool models; every one is a target's shadow when "
                                                               "another is attacked")
    pkeep: float = Float(default=0.5, gt=0, lt=1)
    seed: Seed = 0

    @model_validator(mode="after")
    def _whole_members(self) -> MembershipSpec:
        # Every example is IN exactly int(pkeep * n_models) models (pool/masks.py). A fraction would be
        # truncated silently. Leave-one-out takes the target's own model from one side of each example:
        # with 2 on that side, one shadow is left, whose spread is zero, and LiRA's ratio blows up on
        # exactly the examples of one label (8 models at pkeep 0.25 or 0.75 gave an AUC of 0.000 on a
        # real +1 member shift). Hence at least 3 IN and 3 OUT: two shadows or more on every side.
        members = self.pkeep * self.n_models
        if not float(members).is_integer():
            raise ValueError(f"pkeep x n_models = {self.pkeep!r} x {self.n_models} = {members!r} is not a whole "
                             "number of models (every example is in exactly that many)")
        if not 3 <= members <= self.n_models - 3:
            raise ValueError(f"pkeep x n_models = {int(members)}: every example must be IN at least 3 and OUT of at "
                             "least 3 models, so that leave-one-out attacks keep two shadows on each side (one "
                             "shadow has no spread)")
        return self


class TargetsSpec(Strict):
    count: int = Int(1, MAX_MODELS, description="pool models 0..count-1 play the victim, one at a time")


class LiraSpec(Strict):
    offline_test: Literal["one-sided", "two-sided"] = Field(
        "one-sided", description="one-sided P[Z < s] under OUT (LiRA paper) or the reference code's -log N(s; out)"
    )
    fixed_variance_out: Literal["out", "in"] = Field(
        "out", description="'in' reproduces the reference code's quirk of using the IN std for OUT too"
    )
    equalize_counts: Flag = Field(False, description="truncate IN and OUT shadows to the same count (reference quirk)")


class RmiaSpec(Strict):
    offline_a: float = Float(default=0.3, ge=0, le=1, description="offline RMIA's linear approximation of the IN side: "
                                                                  "Pr(x) = (1+a)/2 mean_OUT + (1-a)/2")
    gamma: float = Float(default=1.0, ge=1, le=1e6,
                         description="x must beat a population sample's likelihood ratio by this factor")


# Measured on digits-mlp (benchmarks/results/adaptive_shadows_*.txt): with 31 quantized shadows the adaptive
# attacker's TPR@0.1%FPR equals that with all 63 (RMIA, fixed-variance LiRA), with 15 it keeps ~90%.
DEFAULT_ADAPTIVE_SHADOWS = 31
# The strongest-attack choice (metrics/select.py) takes the targets this many at a time and attacks
# stand-ins, themselves quantized shadows, with the quantized shadows left once the block and the
# stand-in are out: at least CHOICE_SHADOWS of them.
TARGETS_PER_CHOICE = 4
CHOICE_SHADOWS = 4


class AdaptiveSpec(Strict):
    shadows: int | None = Int(1, MAX_MODELS - 1, default=None,
                              description="quantized shadows per target for attackers that quantize theirs: pool "
                                          "models 0..shadows are quantized and each target is attacked with the "
                                          f"others; default {DEFAULT_ADAPTIVE_SHADOWS} (every other pool model in "
                                          "smaller pools)")


class StrongestSpec(Strict):
    # At least one: an empty list meant every attack, as leaving it out does, under another task hash.
    attacks: list[RegistryName] | None = Field(None, min_length=1, max_length=32,
                                               description="the attacks that count (default: all the task's)")
    pseudo_targets: int = Int(1, 64, default=8, description="shadow models the attacker attacks itself to choose")
    examples: int = Int(100, 1_000_000, default=2000,
                        description="pool examples (a fixed subset) the pseudo-targets are attacked on")


class CalibrationSpec(Strict):
    source: Literal["members", "heldout"] = "members"
    size: int = Int(1, 100_000, default=1024)
    seed: Seed = 0


class HubSpec(Strict):
    repo: str = Field(pattern=r"^[\w.-]+/[\w.-]+$", max_length=200, description="Hub model repository holding the pool")
    revision: str | None = Field(None, pattern=r"^[\w][\w./-]*$", max_length=200,
                                 description="commit hash (or branch/tag) to pin; results record the commit")




class TaskSpec(Strict):
    id: RegistryName
    version: int = Int(1, 1_000_000)
    description: str = Field("", max_length=10_000)
    dataset: DatasetSpec
    model: ModelSpec
    training: TrainingSpec
    membership: MembershipSpec = MembershipSpec()
    targets: TargetsSpec
    queries: list[RegistryName] = Field(default_factory=lambda: ["identity", "hflip"], min_length=1, max_length=16)
    attacks: list[RegistryName] = Field(default_factory=lambda: ["lira-online"], min_length=1, max_length=16)
    lira: LiraSpec = LiraSpec()
    rmia: RmiaSpec | None = Field(None, description="RMIA's options (defaults when absent)")
    plans: list[PlanText] = Field(min_length=1, max_length=32)
    calibration: CalibrationSpec = CalibrationSpec()
    threat_models: list[RegistryName] = Field(default_factory=lambda: ["oblivious"], min_length=1, max_length=16)
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
        shadows, most = self.adaptive.shadows, self.membership.n_models - 1
        block = min(self.targets.count, TARGETS_PER_CHOICE)
        least = max(self.targets.count - 1, min(block + CHOICE_SHADOWS, most))
        if shadows is not None and not least <= shadows <= most:
            raise ValueError(f"adaptive.shadows ({shadows}) must lie between {least} and membership.n_models - 1 "
                             f"({most}): every target's quantized shadows are the other quantized models, so at "
                             f"least targets.count - 1 ({self.targets.count - 1}), and choosing the strongest attack "
                             f"attacks a stand-in with those left once {block} targets and the stand-in are out, at "
                             f"least {CHOICE_SHADOWS}")
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
