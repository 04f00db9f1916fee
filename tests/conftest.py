from __future__ import annotations

import gc
import os
import subprocess
import sys
import warnings
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


@pytest.fixture(autouse=True)
def restored_registries() -> Iterator[None]:
    """What a test's plugins register (quantizers, models, datasets, attacks) is gone after it: another test that
    lists a registry sees the built-ins only, whatever order the tests run in."""
    from mia_ptq_bench import attack, data, models, quantize  # noqa: F401  (the built-ins registered first)
    from mia_ptq_bench.registry import Registry

    global _REGISTRIES
    if _REGISTRIES is None:  # found once: every Registry the package made
        with warnings.catch_warnings():  # (isinstance on some of torch's lazy objects warns)
            warnings.simplefilter("ignore")
            _REGISTRIES = [obj for obj in gc.get_objects() if isinstance(obj, Registry)]
    saved = [(registry, dict(registry._entries)) for registry in _REGISTRIES]
    yield
    for registry, entries in saved:
        registry._entries.clear()
        registry._entries.update(entries)


_REGISTRIES: list | None = None


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


class HeldClear:
    """A `cache clear` holding ``cache_dir`` alone (with ``task``: that task's cached work), as
    ``exclusive_use`` does; ``end`` releases it.

    ``waiting`` is what a command using the cache is handed to say that it waits: it records the line
    and ends the clear, so that the command goes on. Should the command wait without a word, the
    clear still ends after ``patience`` seconds (the test then fails on ``said``, not by hanging)."""

    def __init__(self, cache_dir: Path, patience: float = 5.0, task: str | None = None) -> None:
        import threading

        from mia_ptq_bench import cache

        if cache.fcntl is None:
            pytest.skip("no flock on this platform")
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.said: list[str] = []
        self._handle = open(cache_dir / cache.LOCK_NAME, "a+b")
        cache.fcntl.flock(self._handle, cache.fcntl.LOCK_EX if task is None else cache.fcntl.LOCK_SH)
        self._task_handle = None if task is None else open(cache_dir / cache.task_lock_name(task), "a+b")
        if self._task_handle is not None:
            cache.fcntl.flock(self._task_handle, cache.fcntl.LOCK_EX)
        self._safety = threading.Timer(patience, self.end)
        self._safety.start()

    def waiting(self, line: str) -> None:
        self.said.append(line)
        self.end()

    def ends_when_the_cli_says_it_waits(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The CLI's commands print the line themselves: let that also end the clear."""
        from mia_ptq_bench import cli

        say = cli._say_waiting
        monkeypatch.setattr(cli, "_say_waiting", lambda line: (say(line), self.waiting(line)))

    def end(self) -> None:
        self._safety.cancel()
        for handle in (self._handle, self._task_handle):
            if handle is not None and not handle.closed:
                handle.close()


@pytest.fixture
def held_clear(tmp_path: Path) -> Iterator[HeldClear]:
    """A clear holding ``tmp_path / "cache"`` (see HeldClear), ended when the test ends."""
    clear = HeldClear(tmp_path / "cache")
    try:
        yield clear
    finally:
        clear.end()
