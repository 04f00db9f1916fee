"""Validating a submission folder: metadata, allowed files, manifest, and every expected result.

Validation never imports or runs submitted code: it reads files.
"""

from __future__ import annotations

import re
import shlex
from collections import Counter
from pathlib import Path

from ..atomic import content_hash, sha256_file
from ..errors import BenchError
from ..limits import MANIFEST_JSON_BYTES
from ..readers import read_json_file
from ..results.io import load_result
from ..results.verify import audit_layers_problem, verify_result
from ..spec import load_registered_task
from ..spec.audit import audit_problems
from ..spec.plans import PrecisionPlan
from .files import scan
from .load import find_submissions, is_submission_folder, load_submission
from .manifest import EVIDENCE_SUFFIX, MANIFEST, manifest_path
from .schema import REFERENCE_ENTRIES, SubmissionSpec, checked_config

ALLOWED_TOP = {"submission.yaml", "README.md"}
ROOT_README = "README.md"  # the one file beside the submission folders
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def expected_results(task_id: str, quantizer_plans: list[str] | None) -> list[tuple[str, str]]:
    spec = load_registered_task(task_id)
    plans = quantizer_plans or list(spec.plans)
    return [(str(PrecisionPlan.parse(p)), threat) for p in plans for threat in spec.threat_models]


def _allowed_outside_results(relative: Path) -> bool:
    parts = relative.parts
    if len(parts) == 1:
        return parts[0] in ALLOWED_TOP or parts[0].startswith("LICENSE") or parts[0].endswith(".py")
    return parts[0] != "results" and relative.suffix == ".py" and all(p.isidentifier() for p in parts[:-1])


def validate_submission(folder: Path, stale: set[Path] | None = None) -> list[str]:
    """Every problem with a submission folder, one line each (file: field: reason). Empty means valid.

    With ``stale`` given, a result of an older task version is added to it instead of being a problem
    (the site leaves such results out one by one, and keeps the submission's others).

    The folder's files are walked first (links, special files, counts and sizes refused, files.py), then
    the metadata is read; results/ must hold exactly the expected ``<task>/<plan>--<threat>.json`` (and
    their .npz) for every listed task, and nothing else, so the site never publishes a file this did not check.
    """
    folder = Path(folder)
    inventory = scan(folder)
    problems: list[str] = list(inventory.problems)
    if folder.is_symlink():
        return problems
    try:
        spec = load_submission(folder)
    except BenchError as exc:
        return problems + str(exc).splitlines()
    metadata = folder / "submission.yaml"
    reference = spec.name in REFERENCE_ENTRIES
    if reference and spec.quantizer.builtin != spec.name:
        problems.append(f"{metadata}: quantizer.builtin: the reference entry {spec.name!r} is the built-in {spec.name}")
    if not reference and spec.quantizer.builtin == "fp32":
        problems.append(f"{metadata}: quantizer.builtin: 'fp32' publishes the full-precision reference rows, which "
                        f"only the reference entry submissions/fp32 may do")
    if spec.quantizer.file is not None and Path(spec.quantizer.file) not in inventory.files:
        problems.append(f"{metadata}: quantizer.file: {spec.quantizer.file} does not exist")

    # the complete set of results this submission must hold, and may hold
    builtin_plans = ["fp32"] if spec.quantizer.builtin == "fp32" and reference else None
    expected: dict[str, tuple] = {}  # "<task>/<plan>--<threat>.json" -> (task spec, plan, threat)
    evidence: dict[str, tuple] = {}  # "<task>/<plan>.models.safetensors" -> (task spec, plan)
    for task_id in spec.tasks:
        try:
            current = load_registered_task(task_id)
        except BenchError as exc:
            problems.append(f"{metadata}: tasks: {exc}")
            continue
        for plan, threat in expected_results(task_id, builtin_plans):
            expected[f"{task_id}/{plan}--{threat}.json"] = (current, plan, threat)
            if plan != "fp32":  # the plan's quantized weights, which --recompute rebuilds the numbers from
                evidence[f"{task_id}/{plan}{EVIDENCE_SUFFIX}"] = (current, plan)
    allowed_results = {MANIFEST, *expected, *evidence, *(name[: -len(".json")] + ".npz" for name in expected)}
    for relative in inventory.files:
        inside = relative.parts[0] == "results" and len(relative.parts) > 1
        name = "/".join(relative.parts[1:])
        if inside and name in allowed_results or not inside and _allowed_outside_results(relative):
            continue
        reason = (f"not an expected result of this submission (results/ holds exactly <task>/<plan>--<threat>.json "
                  f"for the tasks it lists: {', '.join(spec.tasks)}, their .npz and <task>/<plan>{EVIDENCE_SUFFIX})"
                  if inside else
                  "not allowed in a submission (allowed: submission.yaml, README.md, LICENSE*, *.py, "
                  f"results/MANIFEST.json, results/<task>/<plan>--<threat>.json|.npz, <plan>{EVIDENCE_SUFFIX})")
        if "__pycache__" in relative.parts or relative.suffix == ".pyc":
            reason += "; Python's bytecode cache, which git ignores here: delete it"
        problems.append(f"{folder / relative}: (file): {reason}")

    results_dir = folder / "results"
    manifest_file = manifest_path(folder)
    manifest = _read_manifest(manifest_file, problems)
    present = {"/".join(r.parts[1:]) for r in inventory.files
               if r.parts[0] == "results" and (r.suffix == ".json" or r.name.endswith(EVIDENCE_SUFFIX))
               and r != Path("results", MANIFEST)}
    for name in sorted(present & (set(expected) | set(evidence)) - set(manifest)):
        problems.append(f"{results_dir / name}: (file): not listed in {MANIFEST}")
    for name, digest in sorted(manifest.items()):
        path = results_dir / name
        if name not in expected and name not in evidence:
            problems.append(f"{manifest_file}: files.{name[:80]}: not an expected result of this submission")
        elif name not in present:
            problems.append(f"{manifest_file}: files.{name}: listed but missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path}: sha256: does not match {MANIFEST} (the file was changed after it was written)")

    for name, (current, plan) in sorted(evidence.items()):
        if name not in present:
            problems.append(f"{results_dir / name}: (file): missing: plan {plan}'s quantized weights for task "
                            f"{current.id}, from which every number of its results is recomputed")
    made_by: dict[Path, tuple[str, str]] = {}  # result -> its quantizer's (version, config hash)
    hinted: set[str] = set()  # tasks whose first missing result says how to make them
    for name, (current, plan, threat) in expected.items():
        path = results_dir / name
        if name not in present:
            hint = "" if current.id in hinted else (
                f"; `mptq-bench evaluate {spec.name} --task {current.id} --submission {shlex.quote(str(folder))}` writes every "
                "plan and threat model of the task")
            hinted.add(current.id)
            problems.append(f"{path}: (file): missing result for task {current.id}, plan {plan}, threat model "
                            f"{threat}{hint}")
            continue
        problems.extend(_check_result(path, current, spec, plan, threat, made_by, stale))
    # One quantizer, one config: submission.yaml names only some keys, and a result's others (or its
    # version) must not vary from plan to plan or task to task. The most common pair is the submission's.
    if len(set(made_by.values())) > 1:
        usual = Counter(made_by.values()).most_common(1)[0][0]
        for path, made in made_by.items():
            if made != usual:
                problems.append(f"{path}: quantizer: version {made[0][:20]!r} with config hash {made[1][:12]}…, where "
                                f"the submission's other results have version {usual[0][:20]!r} with {usual[1][:12]}… "
                                "(every result of a submission comes from one version and config)")
    return problems


def _read_manifest(path: Path, problems: list[str]) -> dict[str, str]:
    """``{"files": {"<task>/<plan>--<threat>.json": sha256}}``, or {} with the problem recorded."""
    try:
        files = read_json_file(path, MANIFEST_JSON_BYTES, max_depth=2, follow_symlinks=False)["files"]
        if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) and SHA256.match(v)
                                                  for k, v in files.items()):
            raise TypeError("files must map result names to sha256 hex digests")
        return files
    except (BenchError, KeyError, TypeError) as exc:
        reason = str(exc).split(": ")[-1] if isinstance(exc, BenchError) else type(exc).__name__
        problems.append(f"{path}: files: missing or unreadable manifest ({reason}); "
                        "run `mptq-bench evaluate NAME --submission FOLDER` to write it")
        return {}


def _check_result(path: Path, task, spec: SubmissionSpec, plan: str, threat: str,
                  made_by: dict[Path, tuple[str, str]], stale: set[Path] | None) -> list[str]:
    """Records a current result's quantizer (version, config hash) in ``made_by``, and ``path`` in ``stale`` (if
    given) when the result is of an older version of its task. The arrays (.npz) are read only once the
    document itself has no problem."""
    try:
        result = load_result(path)
    except BenchError as exc:
        return str(exc).splitlines()
    submission = spec.name
    problems = []
    if result.task.hash == task.hash:  # a stale result may come from an older version; it is left out anyway
        made_by[path] = (result.quantizer.version, result.quantizer.config_hash)
    # the result must be this submission's quantizer, run with the config its metadata records
    own = spec.quantizer.builtin or spec.name
    if result.quantizer.name != own:
        problems.append(f"{path}: quantizer.name: made by {result.quantizer.name!r}, but this submission's quantizer "
                        f"is {own!r}")
    changed = sorted(k for k, v in spec.quantizer.config.items() if result.quantizer.config.get(k, object()) != v)
    if changed:
        recorded = result.quantizer.config
        shown = "; ".join(f"{k}: {spec.quantizer.config[k]!r} in submission.yaml, "
                          f"{repr(recorded[k]) if k in recorded else 'not set'} in the result" for k in changed)
        problems.append(f"{path}: quantizer.config: {shown} (results must be made with the config the metadata "
                        f"records: fix submission.yaml, or rerun `mptq-bench evaluate {submission} --task {result.task.id} "
                        f"--submission {path.parents[2]}`)")
    if content_hash({k: result.quantizer.model_dump()[k] for k in ("name", "version", "config")}) != \
            result.quantizer.config_hash:
        problems.append(f"{path}: quantizer.config_hash: is not the hash of the recorded name, version and config")
    if plan != "fp32" and result.evidence is None:
        problems.append(f"{path}: evidence: missing: a quantized result names its plan's quantized weights "
                        f"({plan}{EVIDENCE_SUFFIX}), from which every number is recomputed")
    elif plan != "fp32" and result.evidence.file != f"{plan}{EVIDENCE_SUFFIX}":
        problems.append(f"{path}: evidence.file: {result.evidence.file!r} is not this plan's "
                        f"{plan}{EVIDENCE_SUFFIX}")
    if result.task.id != task.id:
        problems.append(f"{path}: task.id: {result.task.id!r} in the folder of task {task.id!r}")
    elif result.task.hash != task.hash and stale is not None:
        stale.add(path)
    elif result.task.hash != task.hash:
        problems.append(f"{path}: task.hash: stale result of {task.id} version {result.task.version} "
                        f"(hash {result.task.hash[:12]}…); the current task is version {task.version} "
                        f"(hash {task.hash[:12]}…): rerun the evaluation")
    elif (result.task.version, result.task.pool_hash) != (task.version, task.pool_hash):  # the site shows them
        problems.append(f"{path}: task.version: the task of this hash is version {task.version} with pool hash "
                        f"{task.pool_hash[:12]}…, the result records version {str(result.task.version)[:20]} and "
                        f"{result.task.pool_hash[:12]}…")
    if result.quantizer.name == "fp32" and submission not in REFERENCE_ENTRIES:
        problems.append(f"{path}: quantizer.name: claims the fp32 reference quantizer, which only the reference "
                        "entry submissions/fp32 may publish")
    try:
        checked_config(result.quantizer.config)  # the site shows it: bounded as the metadata's config is
    except ValueError as exc:
        problems.append(f"{path}: quantizer.config: {exc}")
    if (result.plan, result.threat_model) != (plan, threat):
        problems.append(f"{path}: plan: holds {result.plan}/{result.threat_model}, its name says {plan}/{threat}")
    if not result.audit:
        problems.append(f"{path}: audit: no bit-width audit evidence")
    # The layer list first: a left-out layer shifts which bits the plan gives every later one. (A stale
    # result's task may have had another model.)
    layers = audit_layers_problem(result, task) if result.audit and result.task.hash == task.hash else None
    problems += [f"{path}: {line}" for line in ([layers] if layers else []) + audit_problems(result.audit, plan)]
    if (path.with_suffix(".npz")).is_file() and not problems:  # the arrays once the document itself is sound
        try:
            verify_result(path)
        except BenchError as exc:
            problems.append(str(exc).splitlines()[0])
    return problems


def submission_problems(root: Path) -> dict[Path, list[str]]:
    found = find_submissions(root)
    if not found:
        return {Path(root): [f"{root}: (folder): no submission.yaml here or in its subfolders"]}
    result = {folder: validate_submission(folder) for folder in found}
    if is_submission_folder(root):  # one submission's own folder (the same test as find_submissions')
        return result
    for entry in sorted(Path(root).iterdir()):  # beside the submissions only their README: nothing unchecked
        if entry in found:
            continue
        if entry.is_symlink():
            result[entry] = [f"{entry}: (folder): is a symbolic link; refused"]
        elif entry.is_dir():
            result[entry] = [f"{entry}: submission.yaml: missing (every folder under {root} is a submission)"]
        elif entry.name != ROOT_README:
            result[entry] = [f"{entry}: (file): only submission folders and {ROOT_README} may sit in {root}; refused"]
    return result
