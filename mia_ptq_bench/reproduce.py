"""``mptq-bench reproduce``: rerun committed results on this machine and compare every headline number.

A result file, or a submission folder (all its results), is rerun with the exact task (its
hash must match), quantizer and config (its hash must match) and plan; the numbers are then
compared under the reproducibility contract of ``results/compare.py``. The pool comes from the
cache as usual, but every model is quantized afresh, into a scratch cache of quantized outputs (in
the cache folder) that is thrown away: outputs a run cached earlier would only show that the cache holds what it was given,
and would hide a quantizer whose results change from run to run. Reproducing a submission runs its
code: do it where that is intended (CI's unprivileged pull-request job).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from pydantic import ValidationError

from .cache import in_use
from .cache_admin import remove_stale_scratch, scratch_prefix
from .errors import BenchError
from .pool import autocast_for
from .progress import Progress, SilentProgress
from .results.compare import Comparison, compare_results, needs_pool_spread, regime
from .results.io import load_arrays, load_result
from .results.jackknife import result_pool_spread
from .results.schema import Result
from .runner import RunOptions, evaluate
from .spec import load_registered_task
from .spec.loader import format_validation_error
from .submission import MANIFEST, find_submissions
from .submission.load import METADATA
from .submission.resolve import resolve, submission_quantizer


@dataclass(frozen=True)
class Reproduction:
    path: Path
    regime: str  # results.compare: identical, same pool or retrained pool
    comparisons: list[Comparison]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons)


def result_files(paths: list[Path]) -> list[Path]:
    """Result documents named directly, or every one of each submission folder given."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            folders = find_submissions(path)
            if not folders:
                raise BenchError(f"{path}: not a result file or a submission folder")
            files += [p for f in folders for p in sorted((f / "results").glob("*/*.json")) if p.name != MANIFEST]
        elif path.suffix == ".json":
            files.append(path)
        else:
            raise BenchError(f"{path}: not a result (.json) or a submission folder")
    if not files:
        raise BenchError(f"{', '.join(map(str, paths))}: no result files to reproduce")
    return files


def _submission_of(path: Path) -> Path | None:
    """``submissions/<name>`` for ``submissions/<name>/results/<task>/<file>.json``."""
    folder = path.resolve().parent.parent.parent
    return folder if (folder / METADATA).is_file() else None


def _quantizer_for(path: Path, result: Result):
    folder = _submission_of(path)
    found = submission_quantizer(folder) if folder else resolve(result.quantizer.name)
    try:
        quantizer = found.cls(result.quantizer.config)
    except ValidationError as exc:  # the document's config, which this quantizer's code does not accept
        raise BenchError(format_validation_error(f"{path}: quantizer.config", exc)) from None
    described = quantizer.describe()
    if (described["name"], described["version"], described["config_hash"]) != (
            result.quantizer.name, result.quantizer.version, result.quantizer.config_hash):
        raise BenchError(f"{path}: quantizer: the result was made by {result.quantizer.name} "
                         f"{result.quantizer.version} (config {result.quantizer.config_hash[:12]}), this code is "
                         f"{described['name']} {described['version']} (config {described['config_hash'][:12]})")
    return quantizer


def reproduce(paths: list[Path], options: RunOptions, progress: Progress | None = None,
              tasks: list[str] | None = None) -> list[Reproduction]:
    """Rerun and compare every result of ``paths`` (only those of ``tasks``, if given)."""
    progress = progress or SilentProgress()
    groups: dict[tuple, list[tuple[Path, Result]]] = {}
    for path in result_files(paths):
        result = load_result(path)
        if tasks and result.task.id not in tasks:
            continue
        spec = load_registered_task(result.task.id)
        if spec.hash != result.task.hash:
            raise BenchError(f"{path}: task.hash: the result is of {spec.id} version {result.task.version} "
                             f"({result.task.hash[:12]}…), the task is now version {spec.version} "
                             f"({spec.hash[:12]}…): a stale result cannot be reproduced")
        key = (spec.id, _submission_of(path), result.quantizer.name, result.quantizer.config_hash,
               result.environment.quantize_workers, result.pool_arithmetic)
        groups.setdefault(key, []).append((path, result))
    if not groups:
        raise BenchError(f"no results of task(s) {', '.join(tasks or [])} to reproduce in {', '.join(map(str, paths))}")
    reproductions = []
    # The scratch outputs (several MB per model) live on the cache's disk, which the budget checks and a
    # Ray cluster shares, not in $TMPDIR (often memory).
    # A killed run's folder is removed here; the machine and process in the name keep a concurrent run's.
    Path(options.cache_dir).mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(options.cache_dir)
    with (in_use(Path(options.cache_dir), [task_id for task_id, *_ in groups], waiting=progress.log),
          tempfile.TemporaryDirectory(prefix=scratch_prefix(), dir=options.cache_dir) as scratch):
        for (task_id, _, _, _, workers, arithmetic), members in groups.items():
            first_path, first = members[0]
            quantizer = _quantizer_for(first_path, first)
            plans = list(dict.fromkeys(r.plan for _, r in members))
            threats = list(dict.fromkeys(r.threat_model for _, r in members))
            progress.log(f"rerunning {task_id} · {quantizer.name} · {', '.join(plans)} · {', '.join(threats)} "
                         "(every model quantized afresh; the pool from the cache)")
            spec = load_registered_task(task_id)
            amp = options.amp if options.amp is not None else autocast_for(arithmetic, options.device, progress.log)
            outcome = evaluate(quantizer, spec, plans, threats,
                               replace(options, out_dir=Path(scratch) / "rerun", per_quantizer_folder=True,
                                       outputs_dir=Path(scratch) / "outputs",
                                       # the processes (and so the groups and threads) the result was made in
                                       workers=options.workers if options.workers is not None else workers,
                                       amp=amp),
                               progress)
            rerun = {(r.plan, r.threat_model): (p, r) for p, r in zip(outcome.paths, outcome.results)}
            reference: dict[str, float] | None = None  # the same full-precision targets in every result of the run
            for path, committed in members:
                rerun_path, again = rerun[(committed.plan, committed.threat_model)]
                case = regime(committed, again)
                comparisons = compare_results(committed, again, case)
                # Another draw of the pool moves the targets' numbers together (they share their shadows): where
                # the spread over targets leaves a number outside, the rerun's jackknife over its models decides
                # (it can only widen a tolerance, and costs a rerun of the attacks per target).
                if needs_pool_spread(case, comparisons):
                    progress.log(f"  {again.plan}--{again.threat_model}: a number lies outside 6 standard errors over "
                                 "the targets; measuring how far another pool moves it (a jackknife over the pool's "
                                 "models: the attacks once more per target, about a minute per fashion-mnist-resnet result)")
                    spread = result_pool_spread(spec, again, load_arrays(rerun_path, again), reference)
                    reference = spread.reference
                    comparisons = compare_results(committed, again, case, spread)
                reproductions.append(Reproduction(path, case, comparisons))
    return reproductions
