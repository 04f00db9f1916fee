"""Finding an installed quantizer by name: import paths, the registry, entry points.

``mptq-bench evaluate NAME`` resolves NAME in this order (``submission/resolve.py`` adds the
last step, which reads a submission folder):

1. ``package.module:Class`` or ``path/to/file.py:Class`` -- an import path;
2. the registry: built-ins and any class decorated with ``@register_quantizer``;
3. the entry point ``NAME`` in the group ``mia_ptq_bench.quantizers`` of an installed package;
4. ``<submissions>/NAME/submission.yaml``, whose ``quantizer`` says where the code is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from ..errors import BenchError
from ..extensions import import_module_or_file
from .base import QUANTIZERS, Quantizer, name_problem

ENTRY_POINT_GROUP = "mia_ptq_bench.quantizers"


@dataclass
class Found:
    name: str
    cls: type[Quantizer]
    source: str  # where it came from, for people
    config: dict[str, Any] = field(default_factory=dict)  # a submission's recorded config


def _checked(obj: object, name: str, where: str) -> type[Quantizer]:
    if not (isinstance(obj, type) and issubclass(obj, Quantizer)):
        raise BenchError(f"{where}: {obj!r} is not a subclass of mia_ptq_bench.quantize.Quantizer")
    if not obj.__dict__.get("name"):  # its own name, never one inherited: a subclass of rtn is not rtn
        obj.name = name
    problem = name_problem(obj.name)
    if problem:
        raise BenchError(f"{where}: name: {problem}")
    # Its results would land in the other's folder (on a case-insensitive file system, 'RTN' is 'rtn's).
    same = [known for known in QUANTIZERS if known.lower() == obj.name.lower() and QUANTIZERS.get(known) is not obj]
    if same:
        registered = QUANTIZERS.get(same[0])
        raise BenchError(f"{where}: name: {obj.name!r} is already the registered quantizer {same[0]!r}, "
                         f"{registered.__module__}.{registered.__qualname__}; give this one a name of its own")
    return obj


def load_import_path(path: str, name: str | None = None) -> type[Quantizer]:
    """``package.module:Class`` or ``some/file.py:Class``."""
    module_part, _, class_name = path.rpartition(":")
    if not module_part or not class_name:
        raise BenchError(f"{path!r}: expected module:Class or file.py:Class")
    try:
        module = import_module_or_file(module_part)
    except BenchError as exc:
        raise BenchError(f"{path}: {exc}") from None
    if not hasattr(module, class_name):
        raise BenchError(f"{path}: {module_part} has no attribute {class_name!r}")
    return _checked(getattr(module, class_name), name or class_name, path)


def entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def resolve_installed(name: str) -> Found | None:
    """``name`` as an import path, a registered quantizer or an entry point; None if it is none of them."""
    if ":" in name:
        return Found(name, load_import_path(name), f"import path {name}")
    if name in QUANTIZERS:
        return Found(name, QUANTIZERS.get(name), "built-in registry")
    point = entry_points().get(name)
    if point is None:
        return None
    dist = point.dist.name if point.dist else "?"
    try:
        loaded = point.load()
    except Exception as exc:  # a broken plugin must not look like a missing one
        raise BenchError(f"entry point {name!r} of {dist} ({point.value}) fails to load: {exc}") from None
    return Found(name, _checked(loaded, name, f"entry point {point.value}"), f"entry point of {dist} ({point.value})")


def discover_installed() -> list[tuple[str, str, str]]:
    """(name, source, first line of its docstring) for every registered quantizer and entry point."""
    rows = []
    for name, cls in QUANTIZERS.items():
        builtin = cls.__module__.startswith("mia_ptq_bench.")
        rows.append((name, "built-in" if builtin else f"registered ({cls.__module__})", _doc(cls)))
    for name, point in sorted(entry_points().items()):
        dist = point.dist.name if point.dist else "?"
        rows.append((name, f"entry point of {dist} ({point.value})", ""))
    return rows


def _doc(cls: type) -> str:
    lines = (cls.__doc__ or "").strip().splitlines()
    return lines[0] if lines else ""
