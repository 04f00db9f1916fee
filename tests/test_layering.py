"""The package's shape: one-way data flow between stages, and light contracts that import no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mia_ptq_bench"

# The data flow, upstream first. A module may import from its own stage and any stage before it,
# never from a later one. Utilities come first; composition (runner, CLI, rendering) comes last.
STAGES = [
    {"__init__", "errors", "limits", "readers", "atomic", "allocator", "registry", "cache", "progress", "environment", "executor", "extensions"},
    {"spec"}, {"data"}, {"models"}, {"context"}, {"inference"}, {"pool"}, {"quantize"}, {"attack"}, {"metrics"},
    {"results"}, {"submission"}, {"board"}, {"findings"},
    {"runner", "budget", "recompute", "reproduce", "cache_admin", "plugin", "report", "cli", "__main__", "tasks", "leaderboard"},
]
# Importing these loads torch; the contracts (task, result and submission schemas), the validator
# and the site builder must not.
LIGHT_MODULES = ["mia_ptq_bench.spec.schema", "mia_ptq_bench.spec.loader", "mia_ptq_bench.results.schema",
                 "mia_ptq_bench.results.verify", "mia_ptq_bench.submission", "mia_ptq_bench.board.build",
                 "mia_ptq_bench.findings", "mia_ptq_bench.cli"]


def stage_of(module: str) -> int:
    top = module.split(".")[0]
    for index, names in enumerate(STAGES):
        if top in names:
            return index
    raise AssertionError(f"module {module!r} belongs to no stage: add it to STAGES")


def imports_of(path: Path) -> list[str]:
    """Package-relative modules imported by a file (``from ..pool import x`` in quantize/ -> ``pool``)."""
    relative = path.relative_to(PACKAGE).with_suffix("")
    package = list(relative.parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            if node.module:
                found.append(target)
            else:  # `from . import x`: a submodule, or an attribute of the package's __init__
                found.extend(".".join(base + [a.name]) if (PACKAGE.joinpath(*base, a.name).is_dir()
                                                          or PACKAGE.joinpath(*base, a.name + ".py").is_file())
                             else ".".join(base + ["__init__"]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mia_ptq_bench"):
            found.append(node.module.removeprefix("mia_ptq_bench").lstrip("."))
        elif isinstance(node, ast.Import):
            found.extend(a.name.removeprefix("mia_ptq_bench.") for a in node.names if a.name.startswith("mia_ptq_bench."))
    return [f for f in found if f]


def test_no_module_imports_against_the_data_flow() -> None:
    against = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = stage_of(".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        for target in imports_of(path):
            if stage_of(target) > own:
                against.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not against, "imports against the flow:\n" + "\n".join(against)


def test_the_layering_check_sees_an_import_against_the_flow(tmp_path: Path) -> None:
    """The check above must be able to fail: a pool module importing quantize is caught."""
    module = PACKAGE / "pool" / "_probe_against_flow.py"
    module.write_text("from ..quantize import QUANTIZERS\n")
    try:
        own = stage_of("pool._probe_against_flow")
        assert [t for t in imports_of(module) if stage_of(t) > own] == ["quantize"]
    finally:
        module.unlink()


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_contracts_validator_and_site_import_without_torch(module: str) -> None:
    blocker = (
        "import sys, importlib.abc\n"
        "class NoTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchvision'):\n"
        "            raise ImportError(f'{name} is blocked: this module must not need it')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        f"import {module}\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
