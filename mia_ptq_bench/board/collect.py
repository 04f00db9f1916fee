"""Every validated result under submissions/, as one pandas table (one row per result and attack)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import BenchError
from ..results.io import load_result
from ..results.schema import Result
from ..submission import REFERENCE_ENTRIES, SubmissionSpec, find_submissions, load_submission, validate_submission
from ..submission.schema import REPRODUCED_IN_PULL_REQUESTS
from ..submission.validate import expected_results


@dataclass
class Collected:
    rows: pd.DataFrame
    submissions: dict[str, SubmissionSpec]
    skipped: list[str] = field(default_factory=list)  # one line per submission left out, with the reason


STRONGEST = "strongest"  # the board view ranked by each target's strongest strategy (metrics/select.py)


@dataclass(frozen=True)
class Check:
    """How a result's numbers were checked before the site shows them (``validate --recompute``)."""

    status: str  # recomputed | self-reported | refused | unchecked
    reason: str = ""
    rerun: Result | None = None  # the checker's own numbers: what the site publishes for a recomputed result


UNCHECKED = Check("unchecked")


def _row(name: str, spec: SubmissionSpec, result, attack: str, check: str = "unchecked") -> dict:
    q = result.quantized
    summary = q.strongest if attack == STRONGEST else q.attacks[attack]
    low, one = summary.tpr_at_0_1pct_fpr, summary.tpr_at_1pct_fpr
    nan = float("nan")
    auc = (nan, nan, nan) if attack == STRONGEST else (summary.auc.mean, summary.auc.ci_low, summary.auc.ci_high)
    return {
        "entry": name, "display_name": spec.display_name, "reference": name in REFERENCE_ENTRIES, "check": check,
        "reproduced": result.task.id in REPRODUCED_IN_PULL_REQUESTS,
        "task": result.task.id, "task_version": result.task.version,
        "plan": result.plan, "threat_model": result.threat_model, "attack": attack, "targets": low.n,
        "test_accuracy": q.test_accuracy.mean, "test_accuracy_low": q.test_accuracy.ci_low,
        "test_accuracy_high": q.test_accuracy.ci_high,
        "tpr_at_0_1pct_fpr": low.mean, "tpr_at_0_1pct_fpr_low": low.ci_low, "tpr_at_0_1pct_fpr_high": low.ci_high,
        "true_positives_0_1pct": low.true_positives, "positives": low.positives,
        "false_positives_0_1pct": low.false_positives, "negatives": low.negatives,
        "tpr_at_1pct_fpr": one.mean, "tpr_at_1pct_fpr_low": one.ci_low, "tpr_at_1pct_fpr_high": one.ci_high,
        "false_positives_1pct": one.false_positives,
        "auc": auc[0], "auc_low": auc[1], "auc_high": auc[2],
        "roc_fpr": list(q.roc_fpr_grid) if attack != STRONGEST else [],
        "roc_tpr": list(summary.roc_tpr) if attack != STRONGEST else [],
        "strongest_chosen": ", ".join(f"{k} ({v})" for k, v in q.strongest.chosen.items()) if attack == STRONGEST else "",
        "quantizer_config": result.quantizer.config, "config_hash": result.quantizer.config_hash,
    }


def published_files(folder: Path, spec: SubmissionSpec) -> list[tuple[str, Path]]:
    """(task, result document) for every result a validated submission publishes: exactly the expected ones."""
    return [(task_id, folder / "results" / task_id / f"{plan}--{threat}.json") for task_id in spec.tasks
            for plan, threat in expected_results(task_id, ["fp32"] if spec.quantizer.builtin == "fp32" else None)]


def validated(folder: Path) -> tuple[list[str], set[Path]]:
    """``validate``'s problems with a submission apart from stale results, and the stale result files (left
    out one by one). Which results are stale is returned by the validator, never read off its lines of
    text, which quote what submitters wrote."""
    stale: set[Path] = set()
    return validate_submission(folder, stale), stale


def collect(root: Path, checks: Mapping[Path, Check] | None = None) -> Collected:
    """Load every submission that validates; an invalid one is skipped with its first problem.

    Only what ``validate`` accepted is published, and only the expected result files of the tasks a
    submission lists. A result of an older task version (``validate`` refuses it: its numbers cannot be
    checked against the current task) is left out on its own, with one line; any other problem leaves the
    submission out. Anything that still fails to load skips its submission with one line, never the whole
    build. ``checks`` maps a result file (resolved) to how its numbers were checked and why; a recomputed
    result is shown with the checker's own numbers (its rerun), so nothing the document states reaches the
    site unchecked (intervals, counts and ROC curves included); a refused one leaves its submission out.
    """
    rows, specs, skipped = [], {}, []
    for folder in find_submissions(root):
        try:
            problems, stale = validated(folder)
        except Exception as exc:  # noqa: BLE001 - a validator bug must cost one submission, never the whole site
            problems, stale = [f"the validator failed on it ({type(exc).__name__}: {str(exc)[:160]})"], set()
        if problems:
            skipped.append(f"{folder.name}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
            continue
        try:
            spec = load_submission(folder)
            mine, old = [], {}
            for task_id, path in published_files(folder, spec):
                if path in stale:  # left out one by one, named in one line per task
                    old.setdefault((task_id, path.parent), []).append(path.name)
                    continue
                check = (checks or {}).get(path.resolve(), UNCHECKED)
                if check.status == "refused":
                    raise BenchError(f"{path}: recomputed from its evidence: {check.reason}")
                result = check.rerun or load_result(path)
                mine += [_row(spec.name, spec, result, attack, check.status)
                         for attack in [*result.quantized.attacks, STRONGEST]]
            for (task_id, parent), names in old.items():
                shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
                skipped.append(f"{folder.name}: {parent}: {len(names)} result(s) of an older version of {task_id} "
                               f"({shown}); rerun the evaluation")
        except (BenchError, ValueError, KeyError, TypeError, IndexError) as exc:  # validated, yet unreadable
            skipped.append(f"{folder.name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            continue
        if mine:
            specs[spec.name] = spec
            rows += mine
    return Collected(pd.DataFrame(rows), specs, skipped)
