"""Recompute a committed result from its evidence, running no submitted code.

A quantized result commits, beside its document, the quantized weights of the models it used
(``<plan>.models.safetensors``: per channel a codebook and a code per weight). Against the
task's pool (cached, pulled or trained) this module rebuilds every such model, audits it from
its codebooks, scores it on every pool example and predicts the test split, reruns the attacks
and the choice of the strongest strategy exactly as ``evaluate`` does, and compares every
headline number with the document under the reproducibility contract (``results/compare.py``).

A result is **recomputed** when all of that succeeds and agrees; its rerun (the checker's own
numbers) is what the site publishes. It is **refused** when it disagrees, fails the audit, or
names evidence that is missing, unreadable, inconsistent or without its targets: a quantized
result must be rebuilt from its weights to be published. It stays **self-reported** only where
the evidence holds the targets but not the quantized shadows an adaptive attacker needs (too
large to commit), or the task has changed since.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .attack import THREAT_MODELS, ShadowSet
from .cache import in_use
from .context import threads_of_a_worker
from .data import Split
from .errors import BenchError, PlanError, UnknownNameError
from .inference import score_split
from .metrics.select import attack_reference, attack_targets, candidate_threats
from .models import quantizable_layers
from .pool import Pool
from .pool.train import init_model
from .quantize import QUANTIZERS
from .quantize.batchnorm import fold_batchnorm
from .quantize.evidence import decode_model, encode_model, model_indices
from .quantize.outputs import (ModelOutputs, OutputStore, environment_key, predicted_classes, quantized_outputs,
                               reference_outputs)
from .results.compare import Comparison, PoolSpread, compare_results, needs_pool_spread, regime
from .results.compute import build_evaluation
from .results.io import EVIDENCE_CAP, load_evidence
from .results.jackknife import pool_standard_errors, reference_standard_errors
from .runner import training_speed, where_run
from .results.schema import Result
from .spec.audit import LayerAudit, merge_audits
from .spec.plans import PrecisionPlan

RECOMPUTED, SELF_REPORTED, REFUSED = "recomputed", "self-reported", "refused"
# What a malformed evidence file can raise while it is decoded and loaded into a model.
_EVIDENCE_ERRORS = (BenchError, ValueError, RuntimeError, TypeError, KeyError, IndexError, MemoryError)


@dataclass(frozen=True)
class Recomputation:
    path: Path
    status: str  # recomputed | refused | self-reported
    reason: str  # why it was refused or stays self-reported ("" when recomputed)
    comparisons: list[Comparison]
    rerun: Result | None = None  # the checker's own numbers, when recomputed


def rebuild(pool: Pool, index: int, tensors: dict[str, np.ndarray], device: str) -> tuple[torch.nn.Module, dict]:
    """Model ``index`` from the evidence: the pool's architecture, BatchNorm folded if the evidence says so."""
    spec, dataset = pool.spec, pool.dataset
    try:
        model, distinct = decode_model(init_model(spec, dataset, index), index, tensors)
    except ValueError as unfolded:
        try:
            folded = fold_batchnorm(init_model(spec, dataset, index).eval())
        except BenchError:
            # The architecture has no folded form (it does not trace, or a BatchNorm keeps no running
            # statistics): the tensors fit neither, and fold's advice on the quantizer's bn policy
            # means nothing to whoever checks a file.
            raise unfolded from None
        model, distinct = decode_model(folded, index, tensors)
    return model.to(device), distinct


def _encoded_bytes(pool: Pool, index: int, tensors: dict[str, np.ndarray], device: str) -> int:
    """Model ``index`` of the evidence as the runner encodes it: the size an honest file gives it."""
    return sum(array.nbytes for array in encode_model(index, rebuild(pool, index, tensors, device)[0]).values())


def evidence_outputs(pool: Pool, tensors: dict[str, np.ndarray], plan: PrecisionPlan, test: Split,
                     device: str, wanted: set[int]) -> dict[int, ModelOutputs]:
    """Scores, test predictions and an audit read off the codebooks, for the ``wanted`` models the evidence
    holds (models it holds beyond them cost nothing: a submission does not choose how much is scored)."""
    outputs = {}
    for index in sorted(set(model_indices(tensors)) & wanted):
        model, distinct = rebuild(pool, index, tensors, device)
        layers = quantizable_layers(model)  # in order: the last is the classifier (the plan's -last<b>)
        audit = [LayerAudit.measured(name, plan.bits_for(i, len(layers)), distinct[name], int(layer.weight.shape[0]))
                 for i, (name, layer) in enumerate(layers)]
        scores = score_split(model, pool.dataset, pool.dataset.pool, list(pool.spec.queries), device)
        outputs[index] = ModelOutputs(scores, predicted_classes(model, pool, test, device), audit)
    return outputs


# A rebuilt model must resemble its own pool model at least this many times more than any other
# pool model (mean |cosine| of the layers' output channels, below). Honest runs leave a wide gap:
# over all 1,152 models in the 48 committed evidence files (six quantizers, digits-mlp and
# fashion-mnist-resnet), at least 0.84 with the own model against at most 0.13 with any other.
IDENTITY_RATIO = 2.0


def _channel_rows(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each quantizable layer's output channels as unit rows, after scaling each input channel to unit
    length (a zero channel stays zero).

    The mean |cosine| of matching rows then moves neither when an output channel is scaled or negated
    (a model with BatchNorm folded into its convolutions compares as well with its unfolded pool
    model) nor when an input channel is scaled by a positive factor: a quantizer may equalise
    channels across layers (a unit's weights times s, the next layer's weights from it divided by
    s), which leaves the function of a ReLU network as it was, and the model as recognisable.
    """
    rows = {}
    for name, layer in quantizable_layers(model):
        weight = layer.weight.detach().double().cpu()
        by_input = torch.nn.functional.normalize(weight.transpose(0, 1).flatten(1), dim=1)
        weight = by_input.view(weight.shape[1], weight.shape[0], *weight.shape[2:]).transpose(0, 1)
        rows[name] = torch.nn.functional.normalize(weight.flatten(1), dim=1)
    return rows


def _resemblance(rows: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    dots = torch.cat([(rows[name] * other[name]).sum(1).abs() for name in rows])
    return float(dots.mean())


def identity_problem(pool: Pool, tensors: dict[str, np.ndarray], indices: list[int], device: str) -> str | None:
    """Why the evidence's models ``indices`` are not the pool's models of the same index, or None.

    Without this a result could commit, say, another pool model's quantized weights as target 0:
    the audit passes, the rerun agrees with numbers computed for the swap, and the attack sees a
    model that never trained on target 0's members (no leakage, full accuracy). Each rebuilt model
    must resemble its own pool model at least IDENTITY_RATIO times more than any other. The pool's
    models are read one at a time, so the check holds only the evidence's models in memory.
    """
    rebuilt = {i: _channel_rows(rebuild(pool, i, tensors, device)[0]) for i in indices}
    if not rebuilt:
        return None
    similarity = np.zeros((len(indices), pool.spec.membership.n_models))
    for j in range(pool.spec.membership.n_models):
        own = _channel_rows(pool.load_model(j, "cpu"))
        for row, i in enumerate(indices):
            similarity[row, j] = _resemblance(rebuilt[i], own)
    for row, i in enumerate(indices):
        others = similarity[row].copy()
        others[i] = -np.inf
        closest = int(np.argmax(others))
        if not similarity[row, i] >= IDENTITY_RATIO * others[closest]:  # NaN weights fail too
            return (f"model {i} of the evidence is not recognisably pool model {i}: it resembles it "
                    f"{similarity[row, i]:.3f} and pool model {closest} {others[closest]:.3f} (mean |cosine| of "
                    f"the layers' channels; at least {IDENTITY_RATIO:g}x the closest other is required)")
    return None


def _audit_problem(result: Result, recomputed: list[LayerAudit]) -> str | None:
    recorded = {a.layer: a for a in result.audit}
    for entry in recomputed:
        if not entry.passed:
            return f"audit: layer {entry.layer} holds {entry.max_distinct} values in a channel, its plan allows " \
                   f"{entry.allowed_levels}"
        if entry.layer not in recorded or entry.max_distinct > recorded[entry.layer].max_distinct:
            return f"audit: layer {entry.layer} holds more values than the result records"
    return None


def recompute(path: Path, result: Result, pool: Pool, test: Split, cache_dir: Path,
              device: str = "cpu", memo: dict | None = None) -> Recomputation:
    """``memo``: what the calls of one run share: the identity verdicts of evidence files already checked,
    by ("identity", pool digest, evidence sha256, models) (a plan's threat models share one evidence file),
    and the reference's scores, attacks and jackknife, by ("reference", task hash, pool digest) and ("reference
    spread", task hash, pool digest) (every result of a task shares them; ``test`` is the pool's evaluation
    split, as ``recompute_files`` passes it), and the strongest-strategy choices by ("choices", task hash)
    (keyed within by the content they read)."""
    memo = {} if memo is None else memo
    spec = pool.spec
    threat = THREAT_MODELS.get(result.threat_model)
    task_threats = [THREAT_MODELS.get(n) for n in spec.threat_models] + [threat]
    candidates = candidate_threats(threat, task_threats)
    targets = np.arange(spec.targets.count)
    plan = PrecisionPlan.parse(result.plan)
    # The quantized models are scored as the result says they were, each worker with its share of the threads (a
    # document claiming other workers than it used can only fail the identity it is then held to, never loosen it).
    workers = result.environment.quantize_workers
    # The attacker's shadows are the task's (as the runner picks them), never the document's: fewer
    # shadows make a weaker attack, which the document's numbers would then agree with.
    models = np.array(spec.quantized_shadow_models)
    expected = (list(range(spec.membership.n_models)) if plan.is_full_precision or threat.shadows == "full-precision"
                else [int(m) for m in models])
    if result.shadow_models != expected:
        return Recomputation(path, REFUSED, f"shadow_models: the document names {len(result.shadow_models)} shadow "
                                            f"models, the task's {threat.name} attacker uses {len(expected)} "
                                            f"({expected[0]}..{expected[-1]})", [])
    needs_shadows = ({c.shadows for c in candidates} & {"same-quantizer"}) and not plan.is_full_precision
    if plan.is_full_precision:  # the reference: its models are the pool's own
        outputs = {int(t): reference_outputs(pool, int(t), test, device) for t in targets}
    elif result.evidence is None:
        return Recomputation(path, REFUSED, "evidence: a quantized result names no quantized weights", [])
    else:
        wanted = {int(t) for t in targets} | ({int(m) for m in models} if needs_shadows else set())
        try:
            tensors = load_evidence(path, result)
            indices = sorted(set(model_indices(tensors)) & wanted)
            key = ("identity", pool.store.digest(), result.evidence.sha256, tuple(indices))
            if key not in memo:
                memo[key] = identity_problem(pool, tensors, indices, device)
            problem = memo[key]
            if problem is None:
                with threads_of_a_worker(workers):
                    outputs = evidence_outputs(pool, tensors, plan, test, device, wanted)
        except _EVIDENCE_ERRORS as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return Recomputation(path, REFUSED, f"the evidence cannot be rebuilt into models: {reason}", [])
        if problem is not None:
            return Recomputation(path, REFUSED, problem, [])
    missing = [int(t) for t in targets if int(t) not in outputs]
    if missing:
        return Recomputation(path, REFUSED, f"the evidence lacks targets {missing[:5]}", [])
    # Whatever the evidence holds is audited before anything may stay self-reported: unquantized
    # targets would otherwise pass as "shadows too large to commit" (their encoding is large).
    problem = _audit_problem(result, merge_audits([outputs[i].audit for i in sorted(outputs)]))
    if problem:
        return Recomputation(path, REFUSED, problem, [])
    broken = [i for i in sorted(outputs) if not np.isfinite(outputs[i].scores).all()]
    if broken:  # e.g. NaN biases: no attack can score such a model
        return Recomputation(path, REFUSED, f"the evidence's models {broken[:5]} give non-finite scores", [])
    missing = sorted({int(m) for m in models if needs_shadows and int(m) not in outputs})
    if missing:
        # The runner leaves the shadows out only when all the models' weights pass EVIDENCE_CAP; this
        # estimates that size from the targets as an honest run encodes them (padding the file's
        # records does not count), with a margin of 2 for shadows that hold more values than targets.
        per_model = np.mean([_encoded_bytes(pool, int(t), tensors, device) for t in targets])
        honest = per_model * len({int(t) for t in targets} | {int(m) for m in models})
        if honest <= EVIDENCE_CAP / 2:
            return Recomputation(path, REFUSED, f"the evidence lacks the quantized shadows {missing[:5]}, which an "
                                                f"honest run commits: with them it would hold about "
                                                f"{honest / 2**20:.2f} MiB, within the {EVIDENCE_CAP / 2**20:g} MiB "
                                                "for all models", [])
        return Recomputation(path, SELF_REPORTED, f"the evidence lacks the quantized shadows {missing[:5]} (too "
                                                  f"large to commit: about {honest / 2**20:.1f} MiB with them)", [])

    full = ShadowSet(pool.scores, np.arange(spec.membership.n_models))
    shadows = {"full-precision": full, "same-quantizer": full, "rtn": full}  # at full precision all are the pool
    if "same-quantizer" in {c.shadows for c in candidates} and not plan.is_full_precision:
        shadows["same-quantizer"] = ShadowSet(np.stack([outputs[int(m)].scores for m in models]), models)
    if "rtn" in {c.shadows for c in candidates} and not plan.is_full_precision:  # built-in: the checker runs it
        rtn = QUANTIZERS.get("rtn")()
        store = OutputStore(cache_dir, pool, rtn, plan, environment_key(device, workers))
        with threads_of_a_worker(workers):
            rtn_outputs = quantized_outputs(pool, [int(m) for m in models], rtn, plan, test, store, device)
        shadows["rtn"] = ShadowSet(np.stack([rtn_outputs[int(m)].scores for m in models]), models)
    target_scores = np.stack([outputs[int(t)].scores for t in targets])
    predictions = np.stack([outputs[int(t)].test_predictions for t in targets])
    choices = memo.setdefault(("choices", spec.hash), {})  # what the results' attackers choose on shared shadows
    attacked = attack_targets(spec, pool.keep, targets, target_scores, threat, candidates, shadows, choices=choices)
    key = ("reference", spec.hash, pool.store.digest())
    if key not in memo:  # the pool's own full-precision targets: the same for every result of the task
        reference = {int(t): reference_outputs(pool, int(t), test, device) for t in targets}
        reference_scores = np.stack([reference[int(t)].scores for t in targets])
        memo[key] = (reference_scores, np.stack([reference[int(t)].test_predictions for t in targets]),
                     attack_reference(spec, pool.keep, targets, reference_scores, full, choices))
    reference_scores, reference_predictions, reference_attacked = memo[key]
    labels = test.labels.numpy()
    rerun = result.model_copy(update={
        "quantized": build_evaluation(pool.keep, targets, attacked.membership, predictions, labels, attacked.choices,
                                      attacked.chosen),
        "reference": build_evaluation(pool.keep, targets, reference_attacked.membership, reference_predictions, labels,
                                      reference_attacked.choices, reference_attacked.chosen),
        # the checker's own pool, environment and test split, never the document's claims (compare reads these)
        **where_run(pool, device, workers), "n_test": len(test),
    })
    comparisons = compare_results(result, rerun)
    if needs_pool_spread(regime(result, rerun), comparisons):
        # Another draw of the pool moves the targets' numbers together: the rerun's jackknife over its
        # models decides where the spread over targets is too narrow (reproduce.py does the same).
        key = ("reference spread", spec.hash, pool.store.digest())
        if key not in memo:  # the reference is the pool's own models: the same for every result of the pool
            memo[key] = reference_standard_errors(spec, pool.keep, targets, reference_scores, reference_predictions,
                                                  labels, full)
        spread = PoolSpread(
            quantized=pool_standard_errors(spec, pool.keep, targets, target_scores, predictions, labels, threat,
                                           candidates, shadows),
            reference=memo[key])
        comparisons = compare_results(result, rerun, pool_se=spread)
    bad = [c for c in comparisons if not c.ok]
    if bad:
        first = bad[0]
        numbers = "" if math.isnan(first.committed) else \
            f": committed {first.committed:.6f}, recomputed {first.rerun:.6f}"
        return Recomputation(path, REFUSED, f"{first.result}: {first.metric}{numbers}", comparisons)
    return Recomputation(path, RECOMPUTED, "", comparisons, rerun)


def recompute_files(paths: list[Path], cache_dir: Path, data_root: Path | None = None, download: bool = False,
                    device: str = "cpu", waiting: Callable[[str], None] | None = None) -> list[Recomputation]:
    """Recompute every result file given, loading (or training) each task's pool once, a missing one in the
    arithmetic the task's first result records. ``waiting``: told once if a `cache clear` holds the cache, or a
    task's cached work, when its pool is wanted (``cache.in_use``), and when a pool that result trained under
    bfloat16 autocast must be trained in float32 here."""
    from .context import RunContext
    from .data.splits import evaluation_test_split
    from .pool import autocast_for, build_pool
    from .results.io import load_result
    from .spec import load_registered_task

    outcomes, memo = [], {}
    with contextlib.ExitStack() as held:
        loaded: dict[str, tuple[Pool, Split]] = {}
        for path in paths:
            try:
                result = load_result(path)
                spec = load_registered_task(result.task.id)
            except BenchError as exc:  # validate refuses such a file on its own, with the same line
                outcomes.append(Recomputation(path, REFUSED, str(exc).splitlines()[0], []))
                continue
            if spec.hash != result.task.hash:
                outcomes.append(Recomputation(path, SELF_REPORTED, "stale: the task has changed since", []))
                continue
            if spec.id not in loaded:
                dataset = RunContext(spec, Path(cache_dir), data_root, download, device).dataset()
                # from here the task's cached work is read: `cache clear` (of it, or all) is refused
                held.enter_context(in_use(Path(cache_dir), [spec.id], waiting=waiting))
                # a missing pool trained as the task's first result's was, so as to be the very pool where it can
                amp = autocast_for(result.pool_arithmetic, device, waiting or (lambda line: None))
                pool = build_pool(spec, dataset, cache_dir, device, speed=training_speed(device, amp))
                loaded[spec.id] = (pool, evaluation_test_split(spec.calibration, pool.dataset))
            pool, test = loaded[spec.id]
            try:
                outcomes.append(recompute(path, result, pool, test, Path(cache_dir), device, memo))
            except (PlanError, UnknownNameError) as exc:  # a plan or threat model no one knows: this file only
                outcomes.append(Recomputation(path, REFUSED, str(exc).splitlines()[0], []))
    return outcomes
