from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
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


@pytest.fixture
def live_and_gone_pids() -> Iterator[tuple[int, int]]:
    """The id of a process alive for the whole test, and of one that has exited (and been reaped): what a
    running command's work folder and a killed one's carry in their names."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    try:
        yield sleeper.pid, int(gone.stdout)
    finally:
        sleeper.kill()
        sleeper.wait()
