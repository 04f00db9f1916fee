"""Where cached work lives ($MPTQ_CACHE, or ~/.cache/mia-ptq-bench), and which runs are using it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import CacheError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs and `cache clear` then do not see each other
    fcntl = None

CACHE_ENV = "MPTQ_CACHE"
# A run holds a shared lock on this file while it reads or writes the cache, and a shared lock on its
# task's (``task_lock_name``); `cache clear` needs the first exclusively, `cache clear --task T` the first
# shared and T's exclusively, so that it goes on beside runs of other tasks (the first exclusively while
# T's file is missing: a run that cannot write the cache cannot make it). Advisory locks (flock) go
# with their process however it ends, so a killed run leaves nothing to clean up. Clears never wait
# (they are refused at once), so runs, which may wait, cannot deadlock with them.
LOCK_NAME = ".in-use.lock"


def task_lock_name(task: str) -> str:
    """The lock file of one task's cached work (task ids are file-name safe: ``[a-z0-9][a-z0-9.-]*``)."""
    return f".in-use.{task}.lock"


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    # The XDG spec: an empty or relative XDG_CACHE_HOME is ignored (a relative one would move with the directory).
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "mia-ptq-bench"


def _lock_file(cache_dir: Path, create: bool, name: str = LOCK_NAME):
    if fcntl is None or not (create or Path(cache_dir).is_dir()):
        return None
    path = Path(cache_dir) / name
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        return open(path, "a+b")
    except OSError:
        pass
    try:  # a lock file another user made: reading is enough to lock it
        return open(path, "rb")
    except OSError:  # a folder this process cannot write: the run's own checks say so, clearly
        return None


def _wait_for(handle, waiting: Callable[[str], None] | None, message: str) -> None:
    """A shared lock on ``handle``; if a clear holds it, ``message`` through ``waiting`` first, once."""
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting(message)
            fcntl.flock(handle, fcntl.LOCK_SH)
    except OSError:  # a file system without flock (some network mounts): runs go on unguarded
        pass


def _or_refuse(handle, operation: int, refusal: str) -> None:
    """``operation`` on ``handle`` at once, or CacheError(``refusal``) if a run (or clear) holds it."""
    try:
        fcntl.flock(handle, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        raise CacheError(refusal) from None
    except OSError:  # no flock on this file system: as unguarded as the runs
        pass


@contextlib.contextmanager
def in_use(cache_dir: Path, tasks: Iterable[str], create: bool = True,
           waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """Mark the cache, and the cached work of ``tasks``, as used by this run while the block runs:
    ``exclusive_use`` (``cache clear``) of the cache, or of one of these tasks, is refused meanwhile.
    Any number of runs may hold it at once; one starting during such a clear waits for it, and says so
    once through ``waiting`` (a clear suspended with Ctrl-Z, or on a slow disk, would otherwise hold it
    without a word).
    ``create``: make the cache folder if it is missing (else a missing one is not locked: a run that
    only reads the cache finds nothing there to protect)."""
    with contextlib.ExitStack() as held:
        handle = _lock_file(cache_dir, create)
        if handle is not None:
            held.enter_context(handle)
            _wait_for(handle, waiting, f"{cache_dir}: a `cache clear` holds this cache; waiting for it to finish")
            for task in sorted(set(tasks)):
                task_handle = _lock_file(cache_dir, create, task_lock_name(task))
                if task_handle is not None:
                    held.enter_context(task_handle)
                    _wait_for(task_handle, waiting, f"{cache_dir}: a `cache clear --task {task}` holds this task's "
                                                    "cached work; waiting for it to finish")
        yield


RUNS = "evaluate, reproduce, validate or leaderboard build with --recompute, or a pool pull or push"


@contextlib.contextmanager
def exclusive_use(cache_dir: Path, action: str, task: str | None = None) -> Iterator[None]:
    """Hold the cache alone while the block runs, or with ``task`` only that task's cached work (runs of
    other tasks go on); refuse at once if a run is using it, or another clear holds what it needs."""
    handle = _lock_file(cache_dir, create=False)
    if handle is None:
        yield
        return
    with contextlib.ExitStack() as held:
        held.enter_context(handle)
        if task is None:
            _or_refuse(handle, fcntl.LOCK_EX, f"{cache_dir}: a run ({RUNS}) or a `cache clear --task` "
                                              f"is using this cache; {action} when it has finished")
        elif (Path(cache_dir) / task_lock_name(task)).is_file():
            _or_refuse(handle, fcntl.LOCK_SH, f"{cache_dir}: a `cache clear` of the whole cache is running; {action} "
                                              "when it has finished")
            _hold_task_alone(held, cache_dir, task, action)
        else:
            # No run of the task has made its lock file: one that cannot write the cache (another user's) may
            # be using it all the same, holding only the cache's lock. Only a cache that no run holds is safe.
            _or_refuse(handle, fcntl.LOCK_EX, f"{cache_dir}: a run ({RUNS}) or a `cache clear` is using this cache, "
                                              f"and no run of {task} has marked its own cached work yet; {action} "
                                              "when they have finished")
            _hold_task_alone(held, cache_dir, task, action)  # marks it: the next clear of the task need not wait
        yield


def _hold_task_alone(held: contextlib.ExitStack, cache_dir: Path, task: str, action: str) -> None:
    task_handle = _lock_file(cache_dir, True, task_lock_name(task))
    if task_handle is not None:
        held.enter_context(task_handle)
        _or_refuse(task_handle, fcntl.LOCK_EX, f"{cache_dir}: a run of {task} ({RUNS}) or another `cache clear "
                                               f"--task {task}` is using its cached work; {action} when it has finished")
