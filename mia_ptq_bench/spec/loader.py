"""Find, read and validate task specs; turn every failure into one clear message."""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import SpecError
from ..limits import TASK_YAML_BYTES
from ..readers import read_yaml_file
from ..registry import did_you_mean
from .schema import TaskSpec

TASKS_ENV = "MPTQ_TASKS"


def task_dirs() -> list[Path]:
    """Where task ids are looked up: $MPTQ_TASKS (os.pathsep-separated), then the bundled tasks."""
    dirs = [Path(p) for p in os.environ.get(TASKS_ENV, "").split(os.pathsep) if p]
    dirs.append(Path(str(resources.files("mia_ptq_bench.tasks"))))
    return dirs


def available_tasks() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in task_dirs():
        for path in sorted(folder.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return found


def resolve_task_path(ref: str | Path) -> Path:
    """A task file: ``ref`` itself where it names one (a .yaml/.yml name, or a path with a folder in it),
    else the registered task of that id. A bare id never looks in the current folder, where a results
    folder of the same name (``<out>/<task id>/``) sits after every evaluation."""
    path = Path(ref)
    if path.suffix.lower() in (".yaml", ".yml") or "/" in str(ref) or os.sep in str(ref):
        if not path.is_file():
            there = path.exists()  # a folder, a pipe or a device: there, but not a file to read
            raise SpecError(f"{path}: {'not a regular file' if there else 'task file not found'}")
        return path
    return registered_task_path(str(ref), "or give a path to a .yaml file")


def registered_task_path(task_id: str, hint: str) -> Path:
    """The file of a registered task (bundled or under $MPTQ_TASKS), or one SpecError naming the known ones."""
    known = available_tasks()
    if task_id not in known:
        names = ", ".join(sorted(known)) or "none"
        raise SpecError(f"unknown task {task_id[:80]!r}{did_you_mean(task_id, known)}; known tasks: {names} ({hint})")
    return known[task_id]


def read_yaml(path: Path, max_bytes: int = TASK_YAML_BYTES, follow_symlinks: bool = True) -> Any:
    """A YAML file as plain data: bounded in size and nesting, UTF-8, no anchors or aliases (readers.py)."""
    return read_yaml_file(Path(path), max_bytes, follow_symlinks)


def format_validation_error(source: str, error: ValidationError,
                            source_of: Callable[[tuple], str] | None = None) -> str:
    """One line per problem: ``file: field.path: reason (got value)``; ``source_of(loc)``, when given, names
    the file that set a field (a task's ``extends:`` parent), else ``source``."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(document)"
        where = source_of(tuple(item["loc"])) if source_of is not None else source
        reason = item["msg"]
        if item["type"] == "extra_forbidden":
            reason = "unknown field"
        got = item.get("input")
        shown = "" if item["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {_short(got)})"
        inherited = f" (inherited by {source})" if where != source else ""
        lines.append(f"{where}: {field}: {reason}{shown}{inherited}")
    return "\n".join(lines)


def _short(value: Any, limit: int = 80) -> str:
    """A value quoted in an error line, cut short: the line names the problem, it does not echo the input."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4,300-digit printing limit (YAML reads 0xfff... as one)
        return f"an integer of {value.bit_length()} bits" if isinstance(value, int) else \
            f"a {type(value).__name__} holding an integer too long to print"
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def validate_document(model: type[BaseModel], data: Any, source: str,
                      source_of: Callable[[tuple], str] | None = None) -> Any:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(source, exc, source_of)) from None


MAX_EXTENDS = 4  # a chain of parents deeper than this is a mistake, not a design


def merge_over(parent: dict, child: dict) -> dict:
    """``child`` over ``parent``: mappings merge key by key, anything else (lists included) is replaced."""
    merged = dict(parent)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_over(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolved_document(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The task file's mapping with its ``extends:`` parent (a task id, or a path beside it) merged under it."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    parent = _parent(path, data.pop("extends", None), chain)
    if parent is None:
        return data
    inherited = resolved_document(parent, (*chain, path.resolve()))
    inherited.pop("id", None)  # a child always names itself
    return merge_over(inherited, data)


def _parent(path: Path, parent_ref: Any, chain: tuple[Path, ...] = ()) -> Path | None:
    """The file a task's ``extends:`` names (None without one), checked: no cycle, not too deep, there."""
    if parent_ref is None:
        return None
    if not isinstance(parent_ref, str) or not parent_ref.strip():
        got = type(parent_ref).__name__ if not isinstance(parent_ref, str) else "an empty string"
        raise SpecError(f"{path}: extends: expected a task id or a .yaml path, got {got}")
    beside = path.parent / parent_ref
    try:
        parent = beside if beside.suffix.lower() in (".yaml", ".yml") else resolve_task_path(parent_ref)
    except SpecError as exc:
        raise SpecError(f"{path}: extends: {exc}") from None
    try:  # a NUL byte, a symbolic-link loop or an over-long name: the file system's refusal, as one line
        chain = (*chain, path.resolve())
        resolved, is_file, exists = parent.resolve(), parent.is_file(), parent.exists()
    except (OSError, RuntimeError, ValueError) as exc:
        raise SpecError(f"{path}: extends: {parent_ref[:200]!r} cannot be read ({exc})") from None
    if resolved in chain:
        cycle = " -> ".join(p.name for p in (*chain, resolved))
        raise SpecError(f"{path}: extends: {parent_ref!r} makes a cycle: {cycle}")
    if len(chain) > MAX_EXTENDS:
        raise SpecError(f"{path}: extends: more than {MAX_EXTENDS} levels of parents")
    if not is_file:  # a folder, a pipe or a device is there, but not a task file to read
        raise SpecError(f"{path}: extends: {parent} {'is not a regular file' if exists else 'not found'}")
    return parent


def _set_in(path: Path, loc: tuple, depth: int = 0) -> Path | None:
    """The nearest file of ``path``'s ``extends:`` chain that holds the field at ``loc`` (None: no file does,
    as for a missing field). Lists are replaced whole when merged, so whoever holds a list holds its items."""
    data = read_yaml(path)
    if _holds(data, loc):
        return path
    if not isinstance(data, dict) or depth >= MAX_EXTENDS:
        return None
    parent = _parent(path, data.get("extends"))
    return None if parent is None else _set_in(parent, loc, depth + 1)


def _holds(node: Any, loc: tuple) -> bool:
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            return False
    return True


def load_registered_task(task_id: str) -> TaskSpec:
    """A task named in a document or a submission: looked up among the registered tasks (bundled or under
    $MPTQ_TASKS) only, never read as a path, so a hostile id cannot point the reader at another file."""
    return load_task(registered_task_path(task_id, "a task of your own is found by its id once its file is in a "
                                                   "folder listed in $MPTQ_TASKS"))


def load_task(ref: str | Path) -> TaskSpec:
    """Load a task by id (bundled or under $MPTQ_TASKS) or by path, its ``extends:`` parents resolved.

    The task's identity (its hash) is that of the resolved spec: how it is written down does not matter.
    """
    path = resolve_task_path(ref)
    spec: TaskSpec = validate_document(TaskSpec, resolved_document(path), str(path),
                                       lambda loc: str(_set_in(path, loc) or path))
    if path.stem != spec.id:
        raise SpecError(f"{path}: id: task id {spec.id!r} must match the file name {path.stem!r}")
    return spec
