"""``evaluate``: one quantizer on one task, at every plan and threat model, into result files.

The stages, in order, each done by the module named:

1. check      every name, plan and threat model resolves before any work   (this module)
2. pool       the task's data and trained pool: cached, pulled or trained  (pool/)
3. reference  the targets at full precision: scores, predictions, attacks  (quantize/outputs, attack/)
4. quantize   per plan, every model its threat models need, as cached units (quantize/outputs)
5. attack     per plan and threat model, membership scores from its shadows (attack/)
6. measure    per-target metrics and their aggregates                      (results/compute)
7. write      the result document and its arrays, atomically               (results/io)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pickle
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .atomic import ensure_writable
from .attack import ATTACKS, THREAT_MODELS, ShadowSet, ThreatModel
from .budget import check_budget, known_shape, measure_model, scoring_work
from .cache import default_cache_dir, in_use
from .context import RunContext, worker_threads
from .data import DATASETS
from .data.splits import evaluation_test_split
from .environment import default_device, environment
from .errors import BenchError, PlanError, SpecError
from .inference import QUERIES
from .metrics.select import attack_reference, attack_targets, candidate_threats, evaluation_arrays
from .models import MODELS
from .executor import Executor, LocalExecutor, ResidentProcesses
from .extensions import defining_files
from .pool import Pool, PoolStore, build_pool, pool_keep_masks
from .pool.hub import pool_source, pull_pool
from .pool.train import Speed, auto_workers
from .progress import Progress, SilentProgress
from .quantize import QUANTIZERS, Quantizer
from .quantize.outputs import ModelOutputs, OutputStore, environment_key, quantize_unit, receive_pool, reference_outputs
from .results.compute import build_evaluation
from .results.io import EVIDENCE_CAP, evidence_path, result_path, write_evidence, write_result
from .results.schema import ArraysRef, Environment, EvidenceRef, PoolSourceRef, QuantizerRef, Result, TaskRef
from .spec.audit import merge_audits
from .spec.plans import PrecisionPlan
from .spec.schema import TaskSpec


@dataclass
class RunOptions:
    out_dir: Path = Path("results")
    cache_dir: Path = field(default_factory=default_cache_dir)
    outputs_dir: Path | None = None  # quantized outputs' cache, if not under cache_dir (reproduce: a fresh one)
    data_root: Path | None = None
    device: str = field(default_factory=default_device)
    download: bool = False
    trainer: str = "auto"
    quantize_group: int = 16  # models quantized together (batched where the method allows)
    executor: Executor = field(default_factory=LocalExecutor)
    # Processes to train and to quantize in, each with its share of the threads (executor local only);
    # None chooses from the work and the machine (pool/train.py auto_workers).
    workers: int | None = None
    # Pool training under bfloat16 autocast (pool/train.py Speed); None: the device's default (yes on a CUDA GPU
    # with native bfloat16, no on a CPU) or, for a resumed pool, the arithmetic it was started in.
    amp: bool | None = None
    per_quantizer_folder: bool = True  # results/<task>/<quantizer>/...; False inside a submission's results/
    extensions: tuple[str, ...] = ()  # loaded extensions, loaded again by every worker process
    task_source: str | None = None  # the task as the user named it (a file path, or an id), for messages


@dataclass
class EvaluateOutcome:
    paths: list[Path]
    results: list[Result]
    pool: Pool


# -- 1. check ---------------------------------------------------------------------------------

MEMBER_CHECK_ENTRIES = 10_000 * 1024  # check_task draws the membership masks of pools up to this many models x examples


def check_task(spec: TaskSpec, source: str | None = None) -> None:
    """Resolve every registry name the task uses, so a typo fails before hours of training."""
    names = [("dataset.name", DATASETS, spec.dataset.name), ("model.arch", MODELS, spec.model.arch)]
    names += [(f"queries[{i}]", QUERIES, name) for i, name in enumerate(spec.queries)]
    names += [(f"attacks[{i}]", ATTACKS, name) for i, name in enumerate(spec.attacks)]
    names += [(f"threat_models[{i}]", THREAT_MODELS, name) for i, name in enumerate(spec.threat_models)]
    for field_path, registry, name in names:
        if name not in registry:
            raise SpecError(f"{source or spec.id}: {field_path}: unknown {registry.kind} {name!r}; "
                            f"known: {', '.join(registry)}")
    # The pool's size is known before any data is read (its pool_size, else the split's registered size). A
    # small pool can leave a model no member, or fewer than a training batch; drawing the masks costs 16 bytes
    # per model and example, too much for the largest pools: build_pool checks every pool anyway.
    shape = known_shape(spec)
    examples = spec.dataset.pool_size or (shape.pool if shape is not None else None)
    if examples is not None and examples * spec.membership.n_models <= MEMBER_CHECK_ENTRIES:
        pool_keep_masks(spec, examples, source)


def resolve_plans(quantizer: Quantizer, spec: TaskSpec, plans: list[str] | None) -> list[PrecisionPlan]:
    texts = plans or quantizer.default_plans or list(spec.plans)
    parsed = [PrecisionPlan.parse(p) for p in texts]
    for plan in parsed:
        reason = quantizer.unsupported(plan)
        if reason:
            raise PlanError(f"quantizer {quantizer.name!r} cannot serve plan {plan}: {reason}")
    return parsed


def resolve_threat_models(spec: TaskSpec, threat_models: list[str] | None) -> list[ThreatModel]:
    return [THREAT_MODELS.get(name) for name in threat_models or spec.threat_models]


# -- 2. pool ----------------------------------------------------------------------------------

def training_speed(device: str, amp: bool | None) -> Speed | None:
    """How a missing pool is trained: bfloat16 autocast as ``amp`` (--amp/--no-amp) asks (refused where the
    device lacks native bfloat16), or None for build_pool's own choice (the device's default, or as started)."""
    return None if amp is None else Speed.for_device(torch.device(device), amp)


def prepare_pool(context: RunContext, options: RunOptions, progress: Progress) -> Pool:
    spec = context.spec
    if spec.hub is not None:
        store = PoolStore(options.cache_dir, spec)
        if not store.is_complete_pool():
            progress.log(f"pulling the pool from the Hub: {spec.hub.repo}@{spec.hub.revision or 'main'}")
            pull_pool(spec, options.cache_dir, spec.hub.repo, spec.hub.revision, context.dataset().digest())
        elif pool_source(store) is None:  # the same task's pool, trained here: another draw of the same recipe
            progress.log(f"the task names the Hub pool {spec.hub.repo}, but a complete pool of the task trained here "
                         f"is cached ({store.root}): using it, so the results name no Hub commit; remove that "
                         "folder to pull the Hub's")
    remote = None if isinstance(options.executor, LocalExecutor) else options.executor
    pool = build_pool(spec, context.dataset(), options.cache_dir, options.device, progress, trainer=options.trainer,
                      speed=training_speed(options.device, options.amp), executor=remote, data_root=options.data_root, download=options.download,
                      extensions=options.extensions, workers=options.workers if remote is None else None)
    return context.remember("pool", pool)


# -- 4. quantize --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Quantizing:
    """Where a run's quantization units go: this process, or ``workers`` resident processes."""

    executor: Executor
    workers: int = 1


def quantize_workers(spec: TaskSpec, pool: Pool, quantizer: Quantizer, options: RunOptions) -> int:
    """Processes to quantize and score in: ``options.workers``, else, for a method that runs long
    (``Quantizer.runs_long``), chosen as for pool training from the work of scoring every model of the
    task's grid (``budget.scoring_work``, which the budget's count of the workers' copies takes too).
    Judged on the task's own grid (``grid_extent``), never on the plans asked, on what is cached or on the
    executor: every run of a task quantizes in the same layout (groups, threads per group), and so to the
    same bits, whichever part of the grid it does and wherever its units run (Ray runs the same groups with
    the same threads)."""
    if options.workers is not None:
        if options.workers < 1:
            raise SpecError(f"worker processes: {options.workers}; need at least 1")
        return options.workers
    grid = grid_extent(spec, quantizer)
    if grid is None:
        return 1
    dataset = pool.dataset
    forward = measure_model(spec, tuple(dataset.input_shape), dataset.num_classes).forward_flops
    work = scoring_work(forward, len(dataset.pool), len(spec.queries), grid)
    return auto_workers(torch.device(options.device), torch.get_num_threads(), work)


def grid_extent(spec: TaskSpec, quantizer: Quantizer) -> tuple[int, int] | None:
    """For a method that runs long: the plans of the task's grid it serves and the pool models each of them
    quantizes for the task's threat models; None for a method that does not run long."""
    if not quantizer.runs_long:
        return None
    plans = [p for p in map(PrecisionPlan.parse, quantizer.default_plans or spec.plans)
             if not p.is_full_precision and not quantizer.unsupported(p)]
    threats = resolve_threat_models(spec, None)
    sources = {c.shadows for t in threats for c in candidate_threats(t, threats)}
    return len(plans), models_quantized(spec, sources)


def models_quantized(spec: TaskSpec, sources: set[str]) -> int:
    """Pool models a plan quantizes for attacks whose shadows are ``sources``: the targets, the adaptive
    attacker's shadows with the method, and those shadows again with RTN (adaptive-rtn)."""
    shadows = set(spec.quantized_shadow_models)
    own = set(range(spec.targets.count)) | (shadows if "same-quantizer" in sources else set())
    return len(own) + len(shadows) * ("rtn" in sources)


def start_quantizing(context: RunContext, pool: Pool, test, quantizer: Quantizer, options: RunOptions, workers: int,
                     held: contextlib.ExitStack, progress: Progress) -> Quantizing:
    if workers <= 1 or not isinstance(options.executor, LocalExecutor):
        return Quantizing(options.executor, workers)  # Ray: its tasks, each group with a worker's threads
    progress.log(f"quantizing in {workers} processes of {worker_threads(workers)} thread(s) each")
    setup = partial(receive_pool, context, pickle.dumps((pool, test)), defining_files(quantizer, quantizer.config))
    return Quantizing(held.enter_context(ResidentProcesses(workers, setup)), workers)


def quantize_groups(indices: list[int], size: int, workers: int) -> list[tuple[int, ...]]:
    """``indices`` in groups of at most ``size``, as even as can be, their number a multiple of ``workers``.

    Fixed by the indices alone, never by which outputs are cached: a batched method's bits can depend (in
    the last place) on the group, so a group is always quantized whole, and a resumed run gives an
    uninterrupted one's bits."""
    if not indices:
        return []
    count = -(-len(indices) // size)
    count = min(-(-count // workers) * workers, len(indices))
    base, extra = divmod(len(indices), count)
    bounds = np.cumsum([0] + [base + (n < extra) for n in range(count)])
    return [tuple(indices[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def quantize_models(context: RunContext, pool: Pool, quantizer: Quantizer, plan: PrecisionPlan, indices: list[int],
                    layout: list[int], options: RunOptions, quantizing: Quantizing, progress: Progress,
                    role: str = "") -> dict[int, ModelOutputs]:
    """Outputs of ``indices`` quantized at ``plan``: the cached ones loaded, every group with a model missing
    quantized again as a unit. The groups are those of ``layout``, every model the method may quantize at
    the plan, whichever of them this run needs (a run of fewer threat models quantizes its models in the
    groups a full run does, and some of their neighbours with them). ``role``: what these models are for,
    when not the method's own (shown in the progress line)."""
    made_in = environment_key(options.device, quantizing.workers)
    store = OutputStore(context.outputs_root, pool, quantizer, plan, made_in, progress)
    outputs = {i: cached for i in indices if (cached := store.load(i)) is not None}
    groups = quantize_groups(layout, options.quantize_group, quantizing.workers)
    # Each group keeps its position in every plan: in resident workers it returns to the process that did it.
    slots = [n for n, group in enumerate(groups) if any(i in indices and i not in outputs for i in group)]
    todo = [i for n in slots for i in groups[n]]
    key = f"quantize-{plan}"
    doing = (f"quantize + score {len(todo)} models, {len(outputs)} of the {len(indices)} needed cached" if todo
             else f"all {len(indices)} models cached")
    progress.start(key, f"{quantizer.name} {plan}{role}: {doing}", len(slots))
    unit_context = context if quantizing.workers == 1 else dataclasses.replace(
        context, threads=worker_threads(quantizing.workers, context.threads))
    quantizing.executor.map(partial(quantize_unit, unit_context, quantizer, str(plan), made_in),
                            [groups[n] for n in slots], slots=slots,
                            gpus=1 if torch.device(options.device).type == "cuda" else 0, progress=progress, key=key,
                            describe=lambda group: f"{plan} models {group[0]}-{group[-1]}")
    for index in [i for i in todo if i in indices]:  # written by the units, possibly in other processes
        loaded = store.load(index)
        if loaded is None:
            raise BenchError(f"{store.path(index)}: missing after quantization finished")
        outputs[index] = loaded
    return outputs


# -- the whole evaluation ----------------------------------------------------------------------

def evaluate(quantizer: Quantizer | str, spec: TaskSpec, plans: list[str] | None = None,
             threat_models: list[str] | None = None, options: RunOptions | None = None,
             progress: Progress | None = None) -> EvaluateOutcome:
    options = options or RunOptions()
    with contextlib.ExitStack() as held:  # what the run holds until it ends: the cache, once checked
        return _evaluate(quantizer, spec, plans, threat_models, options, progress or SilentProgress(), held)


def _evaluate(quantizer: Quantizer | str, spec: TaskSpec, plans: list[str] | None, threat_models: list[str] | None,
              options: RunOptions, progress: Progress, held: contextlib.ExitStack) -> EvaluateOutcome:
    if isinstance(quantizer, str):
        quantizer = QUANTIZERS.get(quantizer)()
    quantizer.progress = progress

    # 1. check
    check_task(spec, options.task_source)
    plan_list = resolve_plans(quantizer, spec, plans)
    quantized = any(not plan.is_full_precision for plan in plan_list)
    threats = resolve_threat_models(spec, threat_models)
    # The strategies an attacker chooses among come from the task and its own threat model, never from which
    # other results this run writes: a document is the same asked alone or with others (as recompute reruns it).
    task_threats = resolve_threat_models(spec, None)

    # What is known to fail is refused before any work: folders that cannot be written, a budget beyond this machine.
    ensure_writable(result_path(options.out_dir, spec.id, quantizer.name if options.per_quantizer_folder else None,
                                "plan", "threat").parent, "results folder")
    ensure_writable(Path(options.cache_dir), "cache folder")
    training_speed(options.device, options.amp)  # --amp where the device would only emulate bfloat16

    # 2. pool
    started_wall = time.time()
    context = RunContext(spec, Path(options.cache_dir), options.data_root, options.download, options.device,
                         extensions=options.extensions, outputs_dir=options.outputs_dir)
    check_budget(spec, options.device, options.cache_dir, plans=[str(p) for p in plan_list],
                 threat_models=[t.name for t in threats], dataset=context.dataset, source=options.task_source,
                 # copies of the data in local worker processes; Ray's workers hold theirs elsewhere
                 workers=options.workers if isinstance(options.executor, LocalExecutor) else 1,
                 quantize_grid=grid_extent(spec, quantizer) if quantized else None)
    context.dataset()  # a data set that cannot be read is refused before the cache is touched
    # From here the run reads and writes the cache: `cache clear` would pull the pool from under it.
    held.enter_context(in_use(Path(options.cache_dir), [spec.id], waiting=progress.log))
    pool = prepare_pool(context, options, progress)
    test = context.remember("test", evaluation_test_split(spec.calibration, pool.dataset))
    targets = np.arange(spec.targets.count)
    keep, test_labels = pool.keep, test.labels.numpy()
    full_precision = ShadowSet(pool.scores, np.arange(spec.membership.n_models))

    # 3. reference: the same targets at full precision, attacked with full-precision shadows
    reference = {int(t): reference_outputs(pool, int(t), test, options.device) for t in targets}
    reference_scores = np.stack([reference[int(t)].scores for t in targets])
    reference_predictions = np.stack([reference[int(t)].test_predictions for t in targets])
    # The strongest-strategy choices read only shadows: every oblivious result makes the reference's.
    choices: dict = {}
    reference_attacked = attack_reference(spec, keep, targets, reference_scores, full_precision, choices)
    reference_eval = build_evaluation(keep, targets, reference_attacked.membership, reference_predictions, test_labels,
                                      reference_attacked.choices, reference_attacked.chosen)

    paths, results = [], []
    folder_name = quantizer.name if options.per_quantizer_folder else None
    quantized_shadows = [int(m) for m in spec.quantized_shadow_models]
    candidates = {t.name: candidate_threats(t, task_threats + [t]) for t in threats}
    workers = quantize_workers(spec, pool, quantizer, options) if quantized else 1
    quantizing = start_quantizing(context, pool, test, quantizer, options, workers, held, progress)
    provenance = _provenance(spec, quantizer, pool, options.device, quantizing.workers)
    for plan in plan_list:
        # 4. quantize: the targets, and the attacker's shadows when it quantizes them too
        sources = {c.shadows for group in candidates.values() for c in group} if not plan.is_full_precision else set()
        indices = sorted({int(t) for t in targets} | (set(quantized_shadows) if "same-quantizer" in sources else set()))
        layout = sorted({int(t) for t in targets} | set(quantized_shadows))  # whichever threats are asked
        outputs = reference if plan.is_full_precision else quantize_models(context, pool, quantizer, plan, indices,
                                                                           layout, options, quantizing, progress)
        shadows = {"full-precision": full_precision, "same-quantizer": full_precision, "rtn": full_precision}
        if "same-quantizer" in sources:
            shadows["same-quantizer"] = ShadowSet(np.stack([outputs[i].scores for i in quantized_shadows]),
                                                  np.array(quantized_shadows))
        if "rtn" in sources:
            rtn = quantize_models(context, pool, QUANTIZERS.get("rtn")(), plan, quantized_shadows, quantized_shadows,
                                  options, quantizing, progress, " (adaptive-rtn shadows)")
            shadows["rtn"] = ShadowSet(np.stack([rtn[i].scores for i in quantized_shadows]), np.array(quantized_shadows))
        target_scores = np.stack([outputs[int(t)].scores for t in targets])
        predictions = np.stack([outputs[int(t)].test_predictions for t in targets])
        audit = merge_audits([outputs[i].audit for i in indices])
        # All of the plan's documents go first, of every threat model (its evidence is theirs too, and
        # holds the shadows only when a run's threats need them): a run that rewrites the plan's shared
        # files, killed or run for fewer threats or another config, leaves results missing, to be
        # written by the next run, never a document pointing at files rewritten under it.
        beside = result_path(options.out_dir, spec.id, folder_name, str(plan), "any")
        for stale in beside.parent.glob(f"{plan}--*.json"):  # "w1.58--*" never matches "w1.58-last8--*"
            differs = _made_otherwise(stale, provenance["quantizer"])
            if differs:
                progress.log(f"replacing {stale}: made with {differs}")
            elif stale.stem.split("--", 1)[-1] not in {t.name for t in threats}:
                progress.log(f"removing {stale}: a plan's documents are rewritten together (rerun its threat model)")
            stale.unlink(missing_ok=True)
            stale.with_suffix(".npz").unlink(missing_ok=True)  # its arrays go with it, or sit there orphaned
        evidence = None if plan.is_full_precision else write_plan_evidence(
            spec, quantizer, plan, outputs, indices, targets, beside)
        for threat in threats:
            # 5. attack, and choose each target's strongest strategy on shadows alone
            attacked = attack_targets(spec, keep, targets, target_scores, threat, candidates[threat.name], shadows,
                                      choices=choices)
            # 6. measure
            evaluation = build_evaluation(keep, targets, attacked.membership, predictions, test_labels,
                                          attacked.choices, attacked.chosen)
            # 7. write
            arrays = {
                "keep": keep, "targets": targets, "target_scores": target_scores, "reference_scores": reference_scores,
                "test_labels": test_labels, "test_predictions": predictions,
                "reference_test_predictions": reference_predictions,
                **{f"shadows__{t.name}__scores": shadows[t.shadows].scores for t in candidates[threat.name]},
                **{f"shadows__{t.name}__models": shadows[t.shadows].models for t in candidates[threat.name]},
                **evaluation_arrays("", attacked), **evaluation_arrays("reference_", reference_attacked),
            }
            finished = time.time()
            result = Result(
                **provenance, plan=str(plan), threat_model=threat.name,
                shadow_models=[int(m) for m in shadows[threat.shadows].models], n_models=spec.membership.n_models,
                n_examples=len(pool.dataset.pool), n_test=len(test), quantized=evaluation, reference=reference_eval,
                audit=audit, arrays=ArraysRef(file="pending.npz", sha256="0" * 64), evidence=evidence,
                started_at=datetime.fromtimestamp(started_wall, timezone.utc),
                finished_at=datetime.fromtimestamp(finished, timezone.utc), seconds=round(finished - started_wall, 3),
            )
            path = result_path(options.out_dir, spec.id, folder_name, str(plan), threat.name)
            results.append(write_result(path, result, arrays))
            paths.append(path)
    return EvaluateOutcome(paths, results, pool)


def write_plan_evidence(spec: TaskSpec, quantizer: Quantizer, plan: PrecisionPlan, outputs: dict[int, ModelOutputs],
                        indices: list[int], targets: np.ndarray, beside: Path) -> EvidenceRef:
    """The quantized weights of every model a plan's results used; only the targets' if that is too large."""
    metadata = {"task_hash": spec.hash, "pool_hash": spec.pool_hash, "plan": str(plan),
                "quantizer_config_hash": quantizer.describe()["config_hash"]}
    path = evidence_path(beside, str(plan))
    everything = {k: v for i in indices for k, v in outputs[i].evidence.items()}
    if sum(v.nbytes for v in everything.values()) <= EVIDENCE_CAP:
        return write_evidence(path, everything, metadata)
    return write_evidence(path, {k: v for t in targets for k, v in outputs[int(t)].evidence.items()}, metadata)


def _made_otherwise(document: Path, quantizer: QuantizerRef) -> str:
    """How the quantizer a result document records differs from ``quantizer`` ("" if it does not, or is unreadable)."""
    try:
        recorded = json.loads(document.read_text(encoding="utf-8"))["quantizer"]
        name, version, config = recorded["name"], recorded["version"], dict(recorded["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    if name != quantizer.name:
        return f"another quantizer ({name!r})"
    if version != quantizer.version:
        return f"version {version} of {name} (this run: {quantizer.version})"
    changed = sorted(k for k in {*config, *quantizer.config} if config.get(k) != quantizer.config.get(k))
    return "another config (" + ", ".join(f"{k}: {config.get(k)!r} -> {quantizer.config.get(k)!r}"
                                           for k in changed) + ")" if changed else ""


def _provenance(spec: TaskSpec, quantizer: Quantizer, pool: Pool, device: str, workers: int) -> dict:
    """The parts of every result that name what was run, on what, and where."""
    return {
        "task": TaskRef(id=spec.id, version=spec.version, hash=spec.hash, pool_hash=spec.pool_hash),
        "quantizer": QuantizerRef(**quantizer.describe()),
        **where_run(pool, device, workers),
    }


def where_run(pool: Pool, device: str, workers: int = 1) -> dict:
    """The pool (its Hub source, its digest) and the environment a result was computed with: what
    ``results.compare`` reads to choose a rerun's tolerance (``recompute`` records its own the same way)."""
    return {"pool_source": PoolSourceRef.of(pool_source(pool.store)), "pool_digest": pool.store.digest(),
            "pool_arithmetic": pool.store.arithmetic(),
            "environment": Environment(**environment(device, workers))}
