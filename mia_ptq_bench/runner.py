"""``evaluate``: spec -> pool -> quantize -> score -> attack -> metrics -> result files.

For each precision plan the targets are quantized (and, for the adaptive threat
model, every pool model, since the attacker's shadows are quantized the same
way), scored on every pool example, attacked with leave-one-out shadows, and
measured against the same targets at full precision. Quantized outputs are
cached per model, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .atomic import content_hash, write_npz_atomic
from .attack import ATTACKS, leave_one_out
from .cache import default_cache_dir
from .data import ImageDataset, Split, load_dataset
from .environment import default_device, environment
from .executor import Executor, LocalExecutor
from .errors import BenchError, PlanError, SpecError
from .pool import Pool, PoolStore, build_pool
from .pool.hub import pool_source, pull_pool
from .progress import Progress, SilentProgress
from .quantize import QUANTIZERS, Calibration, LayerAudit, Quantizer, audit_model, enforce_audit
from .results.compute import build_evaluation
from .results.io import MEMBERSHIP, REFERENCE_MEMBERSHIP, result_path, write_result
from .results.schema import ArraysRef, Environment, PoolSourceRef, QuantizerRef, Result, TaskRef
from .score import predict_logits, score_split
from .spec.plans import PrecisionPlan
from .spec.schema import TaskSpec


@dataclass
class RunOptions:
    out_dir: Path = Path("results")
    cache_dir: Path = field(default_factory=default_cache_dir)
    data_root: Path | None = None
    device: str = field(default_factory=default_device)
    download: bool = False
    trainer: str = "auto"
    quantize_group: int = 16  # models quantized together (batched where the method allows)
    executor: Executor = field(default_factory=LocalExecutor)
    per_quantizer_folder: bool = True  # results/<task>/<quantizer>/...; False inside a submission's results/


@dataclass(frozen=True)
class ModelOutputs:
    scores: np.ndarray  # (N, Q) on the pool
    test_predictions: np.ndarray  # (n_test,) on the evaluation test split
    audit: list[LayerAudit]


# -- checks before any work ---------------------------------------------------------------

def check_task(spec: TaskSpec) -> None:
    """Resolve every registry name the task uses, so a typo fails before hours of training."""
    from .data import DATASETS
    from .models import MODELS

    DATASETS.get(spec.dataset.name)
    MODELS.get(spec.model.arch)
    for attack in spec.attacks:
        ATTACKS.get(attack)


def resolve_plans(quantizer: Quantizer, spec: TaskSpec, plans: list[str] | None) -> list[PrecisionPlan]:
    texts = plans or quantizer.default_plans or list(spec.plans)
    parsed = [PrecisionPlan.parse(p) for p in texts]
    for plan in parsed:
        reason = quantizer.unsupported(plan)
        if reason:
            raise PlanError(f"quantizer {quantizer.name!r} cannot serve plan {plan}: {reason}")
    return parsed


# -- calibration and the evaluation test split ----------------------------------------------

def heldout_indices(spec: TaskSpec, dataset: ImageDataset) -> np.ndarray:
    if spec.calibration.source != "heldout":
        return np.array([], dtype=np.int64)
    if spec.calibration.size >= len(dataset.test):
        raise SpecError(f"calibration.size: {spec.calibration.size} held-out images would leave no test split "
                        f"(the test split has {len(dataset.test)})")
    order = np.random.RandomState(spec.calibration.seed).permutation(len(dataset.test))
    return np.sort(order[: spec.calibration.size])


def evaluation_test_split(spec: TaskSpec, dataset: ImageDataset) -> Split:
    keep = np.ones(len(dataset.test), dtype=bool)
    keep[heldout_indices(spec, dataset)] = False
    return dataset.test.take(np.flatnonzero(keep))


def calibration_set(spec: TaskSpec, dataset: ImageDataset, keep: np.ndarray, model_index: int, size: int,
                    device: str | torch.device) -> Calibration:
    """The model's calibration data: ``size`` of its own members, or the task's held-out test images."""
    cal = spec.calibration
    if cal.source == "heldout":
        raw = dataset.test.images[torch.as_tensor(heldout_indices(spec, dataset))]
    else:
        members = np.flatnonzero(keep[model_index])
        chosen = np.random.RandomState(cal.seed + model_index).choice(len(members), min(size, len(members)),
                                                                     replace=False)
        raw = dataset.pool.images[torch.as_tensor(np.sort(members[chosen]))]
    augment = spec.training.augment
    return Calibration(raw.to(device), dataset.normalize, augment.crop_padding, augment.hflip, cal.seed + model_index)


# -- per-model outputs, cached ------------------------------------------------------------------

class OutputStore:
    """Quantized-model outputs, one .npz per model, keyed by pool, quantizer config, plan and calibration."""

    def __init__(self, cache_dir: Path, pool: Pool, quantizer: Quantizer, plan: PrecisionPlan,
                 progress: Progress | None = None) -> None:
        spec = pool.spec
        self.progress = progress or SilentProgress()
        described = quantizer.describe()
        calibration = content_hash(spec.calibration.model_dump(mode="json"))
        self.root = (Path(cache_dir) / "quantized" / pool.store.root.name /
                     f"{quantizer.name}-{described['config_hash'][:12]}" / f"{plan}-cal{calibration[:8]}")

    def path(self, index: int) -> Path:
        return self.root / f"model-{index:04d}.npz"

    def load(self, index: int) -> ModelOutputs | None:
        path = self.path(index)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as archive:
                audit = [LayerAudit.model_validate(x) for x in json.loads(str(archive["audit_json"]))]
                return ModelOutputs(archive["scores"], archive["test_predictions"], audit)
        except Exception as exc:  # zip CRC, truncation, bad JSON: all mean the file cannot be used
            self.progress.log(f"redoing model {index}: {path}: corrupted cache file ({type(exc).__name__}: {exc})")
            path.unlink(missing_ok=True)
            return None

    def save(self, index: int, outputs: ModelOutputs) -> None:
        write_npz_atomic(self.path(index), {
            "scores": outputs.scores, "test_predictions": outputs.test_predictions,
            "audit_json": np.array(json.dumps([a.model_dump(mode="json") for a in outputs.audit])),
        })


def predicted_classes(model: torch.nn.Module, pool: Pool, test: Split, device: str) -> np.ndarray:
    return predict_logits(model, pool.dataset, test, "identity", device).argmax(dim=1).numpy()


def reference_outputs(pool: Pool, index: int, test: Split, device: str) -> ModelOutputs:
    model = pool.load_model(index, device)
    return ModelOutputs(pool.scores[index], predicted_classes(model, pool, test, device),
                        audit_model(model, PrecisionPlan(None)))


def quantized_outputs(pool: Pool, indices: list[int], quantizer: Quantizer, plan: PrecisionPlan, test: Split,
                      store: OutputStore, device: str) -> dict[int, ModelOutputs]:
    """Quantize, audit and score a group of pool models (cached ones are loaded, not redone)."""
    outputs = {i: cached for i in indices if (cached := store.load(i)) is not None}
    todo = [i for i in indices if i not in outputs]
    if not todo:
        return outputs
    spec = pool.spec
    size = quantizer.calibration_size(spec.calibration.size) if spec.calibration.source == "members" else 0
    models = [pool.load_model(i, device) for i in todo]
    calibrations = [calibration_set(spec, pool.dataset, pool.keep, i, size, device) for i in todo]
    quantized = quantizer.quantize_many(models, calibrations, plan)
    for index, model in zip(todo, quantized):
        audit = audit_model(model, plan)
        enforce_audit(audit, plan, f"quantizer {quantizer.name!r} on pool model {index}")
        scores = score_split(model, pool.dataset, pool.dataset.pool, list(spec.queries), device)
        predictions = predicted_classes(model, pool, test, device)
        if not np.isfinite(scores).all():
            raise BenchError(f"quantizer {quantizer.name!r} at {plan}: model {index} produced non-finite outputs")
        outputs[index] = ModelOutputs(scores, predictions, audit)
        store.save(index, outputs[index])
    return outputs


@dataclass(frozen=True)
class QuantizeJob:
    """One group of pool models to quantize, audit and score at one plan; self-contained for other processes."""

    spec: TaskSpec
    quantizer: Quantizer
    plan: str
    indices: tuple[int, ...]
    cache_dir: Path
    data_root: Path | None
    download: bool
    device: str
    threads: int


_POOLS: dict[tuple, tuple[Pool, Split]] = {}  # per process: the pool a job needs, loaded once


def _pool_key(spec: TaskSpec, cache_dir: Path, data_root: Path | None) -> tuple:
    return (spec.hash, str(cache_dir), str(data_root))


def quantize_job(job: QuantizeJob) -> list[int]:
    """Quantize a group into the output cache; in a worker, the pool is read from the shared cache."""
    torch.set_num_threads(job.threads)
    key = _pool_key(job.spec, job.cache_dir, job.data_root)
    if key not in _POOLS:
        dataset = load_dataset(job.spec.dataset, job.data_root, job.download)
        pool = build_pool(job.spec, dataset, job.cache_dir, job.device)  # complete: loads, never trains
        _POOLS[key] = (pool, evaluation_test_split(job.spec, dataset))
    pool, test = _POOLS[key]
    plan = PrecisionPlan.parse(job.plan)
    store = OutputStore(job.cache_dir, pool, job.quantizer, plan)
    quantized_outputs(pool, list(job.indices), job.quantizer, plan, test, store, job.device)
    return list(job.indices)


# -- attack ------------------------------------------------------------------------------------

def run_attacks(spec: TaskSpec, keep: np.ndarray, shadow_scores: np.ndarray, targets: np.ndarray,
                target_scores: np.ndarray) -> dict[str, np.ndarray]:
    """Membership scores (T, N) per attack; each target's shadows are all other pool models."""
    membership = {}
    for name in spec.attacks:
        attack = ATTACKS.get(name)
        rows = []
        for row, target in enumerate(targets):
            shadows = leave_one_out(keep.shape[0], int(target))
            rows.append(attack(shadow_scores[shadows], keep[shadows], target_scores[row], spec.lira))
        membership[name] = np.stack(rows)
    return membership


def merge_audits(audits: list[list[LayerAudit]]) -> list[LayerAudit]:
    merged = []
    for layer_entries in zip(*audits):
        worst = max(layer_entries, key=lambda a: a.max_distinct)
        merged.append(worst.model_copy(update={"passed": all(a.passed for a in layer_entries)}))
    return merged


# -- the whole evaluation ----------------------------------------------------------------------

@dataclass
class EvaluateOutcome:
    paths: list[Path]
    results: list[Result]
    pool: Pool


def evaluate(quantizer: Quantizer | str, spec: TaskSpec, plans: list[str] | None = None,
             threat_models: list[str] | None = None, options: RunOptions | None = None,
             progress: Progress | None = None) -> EvaluateOutcome:
    options = options or RunOptions()
    progress = progress or SilentProgress()
    if isinstance(quantizer, str):
        quantizer = QUANTIZERS.get(quantizer)()
    quantizer.progress = progress
    check_task(spec)
    plan_list = resolve_plans(quantizer, spec, plans)
    threats = threat_models or list(spec.threat_models)
    for threat in threats:
        if threat not in ("oblivious", "adaptive"):
            raise SpecError(f"unknown threat model {threat!r}; known: oblivious, adaptive")

    started_wall = time.time()
    dataset = load_dataset(spec.dataset, options.data_root, options.download)
    if spec.hub is not None and not PoolStore(options.cache_dir, spec).is_complete_pool():
        progress.log(f"pulling the pool from the Hub: {spec.hub.repo}@{spec.hub.revision or 'main'}")
        pull_pool(spec, options.cache_dir, spec.hub.repo, spec.hub.revision)
    remote = None if isinstance(options.executor, LocalExecutor) else options.executor
    pool = build_pool(spec, dataset, options.cache_dir, options.device, progress, trainer=options.trainer,
                      executor=remote, data_root=options.data_root, download=options.download)
    test = evaluation_test_split(spec, dataset)
    _POOLS[_pool_key(spec, options.cache_dir, options.data_root)] = (pool, test)
    test_labels = test.labels.numpy()
    targets = np.arange(spec.targets.count)
    env = Environment(**environment(options.device))
    source = pool_source(pool.store)
    source_ref = PoolSourceRef(repo=source.repo, revision=source.revision) if source else None
    task_ref = TaskRef(id=spec.id, version=spec.version, hash=spec.hash, pool_hash=spec.pool_hash)
    described = quantizer.describe()
    quantizer_ref = QuantizerRef(**described)

    reference = [reference_outputs(pool, int(t), test, options.device) for t in targets]
    reference_scores = np.stack([r.scores for r in reference])
    reference_predictions = np.stack([r.test_predictions for r in reference])
    reference_membership = run_attacks(spec, pool.keep, pool.scores, targets, reference_scores)
    reference_eval = build_evaluation(pool.keep, targets, reference_membership, reference_predictions, test_labels)

    paths, results = [], []
    for plan in plan_list:
        needs_all = "adaptive" in threats and not plan.is_full_precision
        indices = list(range(spec.membership.n_models)) if needs_all else [int(t) for t in targets]
        if plan.is_full_precision:
            outputs = {int(t): reference[row] for row, t in enumerate(targets)}
        else:
            store = OutputStore(options.cache_dir, pool, quantizer, plan, progress)
            outputs = {i: cached for i in indices if (cached := store.load(i)) is not None}
            todo = [i for i in indices if i not in outputs]
            groups = [tuple(todo[s : s + options.quantize_group]) for s in range(0, len(todo), options.quantize_group)]
            key = f"quantize-{plan}"
            progress.start(key, f"{quantizer.name} {plan}: quantize + score {len(todo)} of {len(indices)} models",
                           len(groups))
            jobs = [QuantizeJob(spec, quantizer, str(plan), group,
                                Path(options.cache_dir), options.data_root, options.download, options.device,
                                torch.get_num_threads()) for group in groups]
            gpus = 1 if torch.device(options.device).type == "cuda" else 0
            options.executor.map(quantize_job, jobs, gpus=gpus, progress=progress, key=key,
                                 describe=lambda job: f"{job.plan} models {job.indices[0]}-{job.indices[-1]}")
            for index in todo:  # written by the jobs, possibly in other processes
                loaded = store.load(index)
                if loaded is None:
                    raise BenchError(f"{store.path(index)}: missing after quantization finished")
                outputs[index] = loaded
        target_scores = np.stack([outputs[int(t)].scores for t in targets])
        predictions = np.stack([outputs[int(t)].test_predictions for t in targets])
        audit = merge_audits([outputs[i].audit for i in indices])
        for threat in threats:
            if threat == "adaptive" and not plan.is_full_precision:
                shadow_scores = np.stack([outputs[i].scores for i in range(spec.membership.n_models)])
            else:
                shadow_scores = pool.scores
            membership = run_attacks(spec, pool.keep, shadow_scores, targets, target_scores)
            evaluation = build_evaluation(pool.keep, targets, membership, predictions, test_labels)
            arrays = {
                "keep": pool.keep, "targets": targets, "shadow_scores": shadow_scores, "target_scores": target_scores,
                "reference_scores": reference_scores, "test_labels": test_labels, "test_predictions": predictions,
                "reference_test_predictions": reference_predictions,
                **{MEMBERSHIP + k: v for k, v in membership.items()},
                **{REFERENCE_MEMBERSHIP + k: v for k, v in reference_membership.items()},
            }
            finished = time.time()
            result = Result(
                task=task_ref, quantizer=quantizer_ref, plan=str(plan), threat_model=threat, pool_source=source_ref,
                n_models=spec.membership.n_models, n_examples=len(dataset.pool), n_test=len(test),
                quantized=evaluation, reference=reference_eval, audit=audit,
                arrays=ArraysRef(file="pending.npz", sha256="0" * 64), environment=env,
                started_at=datetime.fromtimestamp(started_wall, timezone.utc),
                finished_at=datetime.fromtimestamp(finished, timezone.utc), seconds=round(finished - started_wall, 3),
            )
            folder_name = quantizer.name if options.per_quantizer_folder else None
            path = result_path(options.out_dir, spec.id, folder_name, str(plan), threat)
            results.append(write_result(path, result, arrays))
            paths.append(path)
    return EvaluateOutcome(paths, results, pool)
