"""Check a result document against its arrays: schema, checksum, audit, and every number recomputed.

From the saved scores the attacks are run again, each target's strongest strategy is chosen
again on the shadows alone, and every metric is recomputed; all must agree with the
document (and the saved membership scores) to 1e-9. This needs the task the result was run
on; a result of an older task version is checked for its arithmetic only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..attack import THREAT_MODELS, ShadowSet, ThreatModel
from ..atomic import arrays_sha256, quantizer_config_hash
from ..errors import BenchError
from ..metrics.select import Attacked, Choice, attack_reference, attack_targets
from ..spec import load_registered_task
from ..spec.audit import audit_problems
from ..spec.plans import PrecisionPlan
from ..spec.schema import TaskSpec
from .compare import differences
from .compute import build_evaluation
from .io import arrays_present, load_arrays, load_result
from .schema import Result

TOLERANCE = 1e-9


def _saved_attacks(arrays: dict[str, np.ndarray], prefix: str, result: Result, which: str) -> Attacked:
    """The membership scores and choices as saved (for results whose task has changed since)."""
    evaluation = result.quantized if which == "quantized" else result.reference
    choices = [t.strongest for t in evaluation.targets]
    membership = {k[len(prefix) + len("membership__"):]: v for k, v in arrays.items()
                  if k.startswith(prefix + "membership__")}
    return Attacked(membership, [Choice(c.threat_model, c.attack, c.estimate) for c in choices],
                    arrays[prefix + "strongest_membership"])


def saved_shadows(arrays: dict[str, np.ndarray], result: Result) -> tuple[list[ThreatModel], dict[str, ShadowSet]]:
    """The threat models whose shadows the arrays hold (least informed first) and those shadows by kind."""
    names = [k.split("__")[1] for k in arrays if k.startswith("shadows__") and k.endswith("__scores")]
    candidates = sorted((THREAT_MODELS.get(name) for name in names), key=lambda t: t.knowledge)
    shadows = {t.shadows: ShadowSet(arrays[f"shadows__{t.name}__scores"], arrays[f"shadows__{t.name}__models"])
               for t in candidates}
    threat = THREAT_MODELS.get(result.threat_model)
    if [int(m) for m in shadows[threat.shadows].models] != result.shadow_models:
        raise BenchError("shadow_models: the document names other shadows than its arrays hold")
    return candidates, shadows


# Every result of a task carries the same reference evaluation (the pool's full-precision targets, attacked
# the same way), and validate reads a dozen results of one pool per submission: the reference's attacks are
# recomputed once per content of their inputs, not once per result. At most this many are kept.
REFERENCES_KEPT = 4
_references: dict[str, Attacked] = {}
# Likewise the strongest-strategy choices (metrics.select.choose_all), which read only shadows that results
# share: every oblivious result of a task makes the reference's, every adaptive-rtn one of a plan the same.
CHOICES_KEPT = 4096
_choices: dict = {}


def _reference_attacks(spec: TaskSpec, keep: np.ndarray, targets: np.ndarray, scores: np.ndarray,
                       full: ShadowSet) -> Attacked:
    key = arrays_sha256(spec.hash, [("keep", keep), ("targets", targets), ("scores", scores),
                                    ("shadows.scores", full.scores), ("shadows.models", full.models)])
    if key not in _references:
        attacked = attack_reference(spec, keep, targets, scores, full, _choices)
        for array in (*attacked.membership.values(), attacked.chosen):
            array.setflags(write=False)  # shared by the results that follow: read, never changed
        _references[key] = attacked
        _drop_oldest(_references, REFERENCES_KEPT)
    kept = _references[key]
    return Attacked(dict(kept.membership), list(kept.choices), kept.chosen)


def _rerun(arrays: dict[str, np.ndarray], spec: TaskSpec, result: Result) -> tuple[Attacked, Attacked]:
    """Attacks and choices of the quantized and the reference evaluation, from the saved scores."""
    keep, targets = arrays["keep"], arrays["targets"]
    candidates, shadows = saved_shadows(arrays, result)
    threat = THREAT_MODELS.get(result.threat_model)
    quantized = attack_targets(spec, keep, targets, arrays["target_scores"], threat, candidates, shadows,
                               choices=_choices)
    reference = _reference_attacks(spec, keep, targets, arrays["reference_scores"], shadows["full-precision"])
    _drop_oldest(_choices, CHOICES_KEPT)
    return quantized, reference


def _drop_oldest(memo: dict, kept: int) -> None:
    while len(memo) > kept:
        memo.pop(next(iter(memo)))  # dicts keep insertion order: the first is the oldest


def _check_arrays(path: Path, arrays: dict[str, np.ndarray], result: Result) -> None:
    """Every array the numbers are recomputed from is present, numeric and of consistent shape.

    The arrays come with a submission: a missing key or a mismatched shape is one line here, not an
    IndexError deep inside the metrics.
    """
    attacks = [(f"membership__{a}", "float") for a in result.quantized.attacks]
    attacks += [(f"reference_membership__{a}", "float") for a in result.reference.attacks]
    attacks += [("strongest_membership", "float"), ("reference_strongest_membership", "float")]
    wanted = [("keep", "bool"), ("targets", "int"), ("test_labels", "int"), ("test_predictions", "int"),
              ("reference_test_predictions", "int"), ("target_scores", "float"), ("reference_scores", "float"),
              *attacks]
    kinds = {"bool": "b", "int": "iu", "float": "fiu"}
    for key, kind in wanted:
        if key not in arrays:
            raise BenchError(f"{path}: arrays: {key} is missing from {result.arrays.file}")
        if arrays[key].dtype.kind not in kinds[kind]:
            raise BenchError(f"{path}: arrays: {key} holds {arrays[key].dtype}, expected {kind} values")
    keep, targets, labels = arrays["keep"], arrays["targets"], arrays["test_labels"]
    if keep.ndim != 2 or targets.ndim != 1 or labels.ndim != 1:
        raise BenchError(f"{path}: arrays: keep must be (models, examples), targets and test_labels one-dimensional")
    n_models, n_examples = keep.shape
    if not labels.size or not targets.size:
        raise BenchError(f"{path}: arrays: test_labels and targets must not be empty (no accuracy or attack without them)")
    for field, claimed, held in (("n_models", result.n_models, n_models), ("n_examples", result.n_examples, n_examples),
                                 ("n_test", result.n_test, labels.size)):
        if claimed != held:
            raise BenchError(f"{path}: {field}: {claimed} in the document, but the arrays hold {held}")
    if targets.min() < 0 or targets.max() >= n_models:
        raise BenchError(f"{path}: arrays: targets must be pool model indices below {n_models}")
    shapes = {key: (targets.size, n_examples) for key, _ in attacks}
    shapes.update(test_predictions=(targets.size, labels.size), reference_test_predictions=(targets.size, labels.size))
    for key, shape in shapes.items():
        if arrays[key].shape != shape:
            raise BenchError(f"{path}: arrays: {key} has shape {arrays[key].shape}, expected {shape} "
                             "(targets x examples, or targets x test images)")
    for key in ("target_scores", "reference_scores"):
        if arrays[key].ndim != 3 or arrays[key].shape[:2] != (targets.size, n_examples):
            raise BenchError(f"{path}: arrays: {key} has shape {arrays[key].shape}, expected "
                             f"({targets.size}, {n_examples}, queries)")
    _check_shadow_arrays(path, arrays, n_models, n_examples)


def _check_shadow_arrays(path: Path, arrays: dict[str, np.ndarray], n_models: int, n_examples: int) -> None:
    """Each attacker's shadows: ``shadows__<threat>__models`` (pool indices) and ``__scores`` (one row each)."""
    threats = {key.split("__")[1] for key in arrays if key.startswith("shadows__")}
    for threat in sorted(threats):
        models, scores = f"shadows__{threat}__models", f"shadows__{threat}__scores"
        for key, kind in ((models, "iu"), (scores, "fiu")):
            if key not in arrays:
                raise BenchError(f"{path}: arrays: {key} is missing (the shadows of {threat!r} come as a pair)")
            if arrays[key].dtype.kind not in kind:
                raise BenchError(f"{path}: arrays: {key} holds {arrays[key].dtype}, expected "
                                 f"{'int' if kind == 'iu' else 'float'} values")
        indices = arrays[models]
        if indices.ndim != 1 or (indices.size and (indices.min() < 0 or indices.max() >= n_models)):
            raise BenchError(f"{path}: arrays: {models} must be pool model indices below {n_models}, one-dimensional")
        expected = (indices.size, n_examples, arrays["target_scores"].shape[2])
        if arrays[scores].shape != expected:
            raise BenchError(f"{path}: arrays: {scores} has shape {arrays[scores].shape}, expected {expected} "
                             "(shadows x examples x queries)")


_LAYER_NAMES: dict[str, list[str] | None] = {}  # task hash -> its model's quantizable layers (None: not buildable)


def audit_layers_problem(result: Result, spec: TaskSpec) -> str | None:
    """Whether the audit lists the task model's quantizable layers, in order: an audit that leaves some out
    would pass layers the plan does not allow, and moves which layers a plan like w1.58-last8 keeps at higher
    precision. None where the dataset registers no shape (an extension's), the model cannot be built here (a
    plugin's not loaded) or torch is missing (this module imports without it, for the site): ``validate
    --recompute`` counts the layers of the evidence's models anyway."""
    try:  # the model is built (on the meta device) only here
        from ..data import DATASET_SHAPES
        from ..models import quantizable_layer_names
    except ImportError:
        return None
    raw = DATASET_SHAPES.get(spec.dataset.name)
    if raw is None:
        return None
    if spec.hash not in _LAYER_NAMES:  # a board or grid checks many results of one task
        try:
            _LAYER_NAMES[spec.hash] = quantizable_layer_names(spec.model, raw.model_input(spec.dataset.image_size),
                                                              raw.classes)
        except (BenchError, RuntimeError, NotImplementedError, TypeError, ValueError):
            # A plugin's model not loaded here (validate without --plugin), or one that cannot be built on the
            # meta device: left, as for an unknown dataset shape, to --recompute.
            _LAYER_NAMES[spec.hash] = None
    names = _LAYER_NAMES[spec.hash]
    if names is None:
        return None
    recorded = [entry.layer for entry in result.audit]
    if recorded == names:
        return None
    first = next((i for i, (a, b) in enumerate(zip(recorded, names)) if a != b), min(len(recorded), len(names)))
    found = repr(recorded[first])[:60] if first < len(recorded) else "nothing"
    wanted = repr(names[first]) if first < len(names) else "no more layers"
    return (f"audit: lists {len(recorded)} layers, the task's {spec.model.arch} has {len(names)} quantizable layers; "
            f"entry {first} is {found}, the model's is {wanted}")


def verify_result(path: Path, arrays_required: bool = True) -> Result:
    """Raise BenchError naming the file and field of the first kind of problem found.

    Without its arrays (git holds none) a document is checked for its schema and audit only,
    unless ``arrays_required``; ``validate --recompute`` then checks its numbers from the evidence.
    """
    result = load_result(path)
    try:
        PrecisionPlan.parse(result.plan)
    except BenchError as exc:
        raise BenchError(f"{path}: plan: {exc}") from None
    try:
        THREAT_MODELS.get(result.threat_model)
    except BenchError as exc:
        raise BenchError(f"{path}: threat_model: {exc}") from None
    quantizer = result.quantizer
    if quantizer.config_hash != quantizer_config_hash(quantizer.name, quantizer.version, quantizer.config):
        raise BenchError(f"{path}: quantizer.config_hash: not the hash of the quantizer's name, version and config "
                         "as recorded (edited after the run?)")
    if not result.audit:
        raise BenchError(f"{path}: audit: no bit-width audit evidence")
    try:
        spec = load_registered_task(result.task.id)
    except BenchError:
        spec = None
    current = spec is not None and spec.hash == result.task.hash
    # The layer list first: a left-out layer shifts which bits the plan gives every later one.
    problems = [p for p in [audit_layers_problem(result, spec) if current else None,
                            *audit_problems(result.audit, result.plan)] if p]
    if problems:
        raise BenchError(f"{path}: {problems[0]}")
    if not arrays_required and not arrays_present(path, result):
        return result
    arrays = load_arrays(path, result)
    _check_arrays(path, arrays, result)
    try:
        if current:
            quantized, reference = _rerun(arrays, spec, result)
        else:
            quantized = _saved_attacks(arrays, "", result, "quantized")
            reference = _saved_attacks(arrays, "reference_", result, "reference")
    except BenchError as exc:
        raise BenchError(f"{path}: {exc}") from None
    except (KeyError, ValueError, TypeError, IndexError, ArithmeticError) as exc:  # right names, wrong contents
        raise BenchError(f"{path}: arrays: cannot rerun the attacks from the saved arrays ({type(exc).__name__}: "
                         f"{exc})") from None
    for name, prefix, attacked, evaluation, predictions in (
        ("quantized", "", quantized, result.quantized, "test_predictions"),
        ("reference", "reference_", reference, result.reference, "reference_test_predictions"),
    ):
        for attack, scores in attacked.membership.items():
            saved = arrays.get(f"{prefix}membership__{attack}")
            if saved is None or saved.shape != scores.shape or not np.allclose(saved, scores, rtol=0, atol=TOLERANCE):
                raise BenchError(f"{path}: arrays.{prefix}membership__{attack}: the saved membership scores are not "
                                 "what the attack gives on the saved scores")
        try:
            recomputed = build_evaluation(arrays["keep"], arrays["targets"], attacked.membership, arrays[predictions],
                                          arrays["test_labels"], attacked.choices, attacked.chosen)
        except (KeyError, ValueError, TypeError, IndexError, ArithmeticError) as exc:  # e.g. a number no evaluation can hold
            raise BenchError(f"{path}: arrays: the saved arrays give no valid {name} evaluation "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
        problems = differences(evaluation.model_dump(mode="json"), recomputed.model_dump(mode="json"), name,
                               TOLERANCE)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise BenchError(f"{path}: {problems[0]}{more}: numbers do not match the saved arrays")
    return result
