"""Validating a submission folder: metadata, allowed files, manifest, and every expected result.

Validation never imports or runs submitted code: it reads files.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import sha256_file
from ..errors import BenchError
from ..results.io import load_result
from ..results.verify import verify_result
from ..spec import load_task
from ..spec.plans import PrecisionPlan
from .load import find_submissions, load_submission
from .manifest import MANIFEST, manifest_path, manifested

ALLOWED_TOP = {"submission.yaml", "README.md"}


def expected_results(task_id: str, quantizer_plans: list[str] | None) -> list[tuple[str, str]]:
    spec = load_task(task_id)
    plans = quantizer_plans or list(spec.plans)
    return [(str(PrecisionPlan.parse(p)), threat) for p in plans for threat in spec.threat_models]


def _allowed(relative: Path) -> bool:
    parts = relative.parts
    if len(parts) == 1:
        return parts[0] in ALLOWED_TOP or parts[0].startswith("LICENSE") or parts[0].endswith(".py")
    if parts[0] == "results":
        if relative == Path("results") / MANIFEST:
            return True
        if len(parts) == 3 and relative.name.endswith(".models.safetensors"):  # a plan's quantized weights
            return True
        return len(parts) == 3 and relative.suffix in (".json", ".npz") and "--" in relative.stem
    return relative.suffix == ".py" and all(p.isidentifier() for p in parts[:-1])  # a package of code


def validate_submission(folder: Path) -> list[str]:
    """Every problem with a submission folder, one line each (file: field: reason). Empty means valid."""
    folder = Path(folder)
    problems: list[str] = []
    try:
        spec = load_submission(folder)
    except BenchError as exc:
        return str(exc).splitlines()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if not _allowed(relative):
            problems.append(f"{path}: (file): not allowed in a submission (allowed: submission.yaml, README.md, "
                            "LICENSE*, *.py, results/MANIFEST.json, results/<task>/<plan>--<threat>.json|.npz)")
    if spec.quantizer.file is not None and not (folder / spec.quantizer.file).is_file():
        problems.append(f"{folder / 'submission.yaml'}: quantizer.file: {spec.quantizer.file} does not exist")

    manifest_file = manifest_path(folder)
    try:
        manifest = json.loads(manifest_file.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        problems.append(f"{manifest_file}: files: missing or unreadable manifest ({type(exc).__name__}); "
                        "run `mptq-bench evaluate NAME --submission FOLDER` to write it")
        manifest = {}
    results_dir = folder / "results"
    present = {str(p.relative_to(results_dir)) for p in manifested(results_dir)} if results_dir.is_dir() else set()
    for name in sorted(present - set(manifest)):
        problems.append(f"{results_dir / name}: (file): not listed in {MANIFEST}")
    for name, digest in sorted(manifest.items()):
        path = results_dir / name
        if not path.is_file():
            problems.append(f"{manifest_file}: files.{name}: listed but missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path}: sha256: does not match {MANIFEST} (the file was changed after it was written)")

    builtin_plans = ["fp32"] if spec.quantizer.builtin == "fp32" else None
    for task_id in spec.tasks:
        try:
            current = load_task(task_id)
        except BenchError as exc:
            problems.append(f"{folder / 'submission.yaml'}: tasks: {exc}")
            continue
        for plan, threat in expected_results(task_id, builtin_plans):
            path = results_dir / task_id / f"{plan}--{threat}.json"
            if not path.is_file():
                problems.append(f"{path}: (file): missing result for task {task_id}, plan {plan}, threat model {threat}")
                continue
            problems.extend(_check_result(path, current, spec.name, plan, threat))
    return problems


def _check_result(path: Path, task, submission: str, plan: str, threat: str) -> list[str]:
    try:
        result = load_result(path)
    except BenchError as exc:
        return str(exc).splitlines()
    problems = []
    if result.task.id != task.id:
        problems.append(f"{path}: task.id: {result.task.id!r} in the folder of task {task.id!r}")
    elif result.task.hash != task.hash:
        problems.append(f"{path}: task.hash: stale result of {task.id} version {result.task.version} "
                        f"(hash {result.task.hash[:12]}…); the current task is version {task.version} "
                        f"(hash {task.hash[:12]}…): rerun the evaluation")
    if (result.plan, result.threat_model) != (plan, threat):
        problems.append(f"{path}: plan: holds {result.plan}/{result.threat_model}, its name says {plan}/{threat}")
    if not result.audit:
        problems.append(f"{path}: audit: no bit-width audit evidence")
    for entry in result.audit:
        if not entry.passed:
            problems.append(f"{path}: audit: layer {entry.layer} holds {entry.max_distinct} values in a channel, "
                            f"its plan allows {entry.allowed_levels}")
    if (path.with_suffix(".npz")).is_file():
        try:
            verify_result(path)
        except BenchError as exc:
            problems.append(str(exc).splitlines()[0])
    return problems


def submission_problems(root: Path) -> dict[Path, list[str]]:
    found = find_submissions(root)
    if not found:
        return {Path(root): [f"{root}: (folder): no submission.yaml here or in its subfolders"]}
    strays = [p for p in Path(root).iterdir() if p.is_dir() and not (p / "submission.yaml").exists()] \
        if not (Path(root) / "submission.yaml").exists() else []
    result = {folder: validate_submission(folder) for folder in found}
    for stray in strays:
        result[stray] = [f"{stray}: submission.yaml: missing (every folder under {root} is a submission)"]
    return result
