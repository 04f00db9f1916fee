from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
TASKS = TESTS / "tasks"
SHARED_FASHION = TESTS.parent.parent / "shared" / "data" / "fashion-mnist"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist every worker (and every process it starts) computes on one thread.

    The workers already run side by side on the cores; a second thread each would oversubscribe them,
    and OpenMP threads that wait by spinning then burn the time the other worker needs.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def strict() -> bool:
    """Whether a missing test dependency must fail its tests instead of skipping them: in CI, and under
    the README's test command (scripts/run-tests), which installs all of them, so a skip there would
    only hide that a test proved nothing."""
    return os.environ.get("CI") == "true" or os.environ.get("MPTQ_NO_SKIPS") == "1"


def needed(module: str, reason: str):
    """``module`` imported, or the test skipped with ``reason`` (failed instead where ``strict``)."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        if strict():
            pytest.fail(f"{reason} (a skip proves nothing here)")
        pytest.skip(reason)


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
