from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).parent
TASKS = TESTS / "tasks"
SHARED_FASHION = TESTS.parent.parent / "shared" / "data" / "fashion-mnist"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own cache and data folders and sees the test tasks; nothing touches ~/.cache."""
    root = tmp_path_factory.mktemp("bench")
    monkeypatch.setenv("MPTQ_CACHE", str(root / "cache"))
    monkeypatch.setenv("MPTQ_DATA", str(root / "data"))
    monkeypatch.setenv("MPTQ_TASKS", str(TASKS))
    return root


@pytest.fixture
def tiny_task():
    from mia_ptq_bench.spec import load_task

    return load_task("tiny-digits")
