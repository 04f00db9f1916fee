"""Every code block of the extension guides and of the submission guide runs, as a reader would run it.

A ``python`` or ``yaml`` block whose first line is ``# <path>`` is written to that path; a ``bash``
block runs as one script (``set -e``) in the same folder; a ``toml`` block must parse; ``text``
blocks are illustrations. Any other block fails the test, so a guide cannot grow an example
that is never run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mia_ptq_bench.spec import load_task

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# the threat models digits-mlp evaluates, each written as its own result file
THREATS = load_task("digits-mlp").threat_models
PAGES = ["extend/quantizer.md", "extend/task.md", "extend/attack.md", "extend/dataset-and-model.md", "submit.md"]
# Pages that start where another left off: their reader has run that page, so has its files and its cache.
PREREQUISITE = {"submit.md": "extend/quantizer.md"}
CHAINED = set(PREREQUISITE) | set(PREREQUISITE.values())  # run in one xdist worker, sharing the ``readers`` fixture


def code_blocks(page: Path) -> list[tuple[str, str]]:
    return [(lang, text) for lang, text in FENCE.findall(page.read_text())]


def write_files(page: Path, folder: Path) -> None:
    for lang, text in code_blocks(page):
        first = text.splitlines()[0]
        if lang in ("python", "yaml") and first.startswith("# ") and "." in first.split()[1]:
            target = folder / first.split()[1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)


def run_page(page: Path, folder: Path) -> list[str]:
    """Run the page's blocks in order in ``folder``, caching in ``folder/cache``; returns the bash output to check."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "COLUMNS": "120", "MPTQ_CACHE": str(folder / "cache")}
    env.pop("MPTQ_TASKS", None)  # a reader has only the bundled tasks and the ones the page writes
    outputs = []
    write_files(page, folder)
    for lang, text in code_blocks(page):
        first = text.splitlines()[0]
        if lang in ("python", "yaml") and first.startswith("# ") and "." in first.split()[1]:
            continue  # written by write_files
        elif lang == "bash":
            proc = subprocess.run(["bash", "-c", "set -e\n" + text], cwd=folder, env=env, capture_output=True,
                                  text=True, timeout=900)
            assert proc.returncode == 0, f"{page.name}: block failed:\n{text}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            outputs.append(proc.stdout)
        elif lang == "toml":
            tomllib.loads(text)
        elif lang != "text":
            pytest.fail(f"{page.name}: a {lang or 'plain'} block that is neither written, run nor parsed:\n{text}")
    return outputs


def test_every_page_is_listed() -> None:
    found = {str(p.relative_to(DOCS)) for p in (DOCS / "extend").glob("*.md") if p.name != "README.md"}
    assert found | {"submit.md"} == set(PAGES)


def result_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*.json")
            if "cache" not in p.relative_to(folder).parts and p.name != "MANIFEST.json"}


@pytest.fixture(scope="module")
def readers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[str]]]:
    """Pages other pages build on, run once: page -> (its reader's folder, the page's outputs)."""
    done: dict[str, tuple[Path, list[str]]] = {}
    for page in sorted(set(PREREQUISITE.values())):
        folder = tmp_path_factory.mktemp(page.replace("/", "-"))
        done[page] = (folder, run_page(DOCS / page, folder))
    return done


@pytest.mark.slow
@pytest.mark.parametrize("page", [pytest.param(page, marks=pytest.mark.xdist_group("readers")) if page in CHAINED
                                  else page for page in PAGES])
def test_guide_examples_run(page: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    readers: dict[str, tuple[Path, list[str]]] = request.getfixturevalue("readers") if page in CHAINED else {}
    if page in readers:
        folder, outputs = readers[page]
        before: set[str] = set()
    else:
        folder = tmp_path / "reader"
        if page in PREREQUISITE:  # continue in a copy of the earlier page's reader: its files and its cache
            shutil.copytree(readers[PREREQUISITE[page]][0], folder, symlinks=True)
        else:
            folder.mkdir()
        before = result_files(folder)
        outputs = run_page(DOCS / page, folder)
    assert outputs, f"{page} has no command to run"
    written = sorted(result_files(folder) - before)
    expected = {
        "extend/quantizer.md": sorted(f"my-results/digits-mlp/floor-rounding/w2--{threat}.json" for threat in THREATS),
        "extend/task.md": ["my-results/digits-small/rtn/w2--oblivious.json"],
        "extend/attack.md": ["my-results/digits-gap/rtn/w2--adaptive.json", "my-results/digits-gap/rtn/w2--oblivious.json"],
        "extend/dataset-and-model.md": ["my-results/noisy-digits-deep/rtn/w2--oblivious.json"],
        "submit.md": sorted(f"submissions/floor-rounding/results/digits-mlp/{plan}--{threat}.json"
                            for plan in ("w1.58", "w1.58-last8", "w2", "w4") for threat in THREATS),
    }[page]
    assert [w for w in written if w.startswith(("my-results", "submissions"))] == expected
    if page == "extend/attack.md":
        # the new attack is a column of the evaluation's AUC table, its name on two header lines
        lines = outputs[0].splitlines()
        assert any("score" in upper and "gap" in lower and upper.rstrip().endswith("score")
                   for upper, lower in zip(lines, lines[1:])), outputs[0]
    if page == "submit.md":
        assert "ok submissions/floor-rounding" in outputs[-1]
