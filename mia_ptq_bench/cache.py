"""Where cached work lives ($MPTQ_CACHE, or ~/.cache/mia-ptq-bench), and which runs are using it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import CacheError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs and `cache clear` then do not see each other
    fcntl = None

CACHE_ENV = "MPTQ_CACHE"
# A run holds a shared lock on this file while it reads or writes the cache; `cache clear` needs it
# exclusively. Advisory locks (flock) go with their process however it ends, so a killed run leaves
# nothing to clean up.
LOCK_NAME = ".in-use.lock"


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    # The XDG spec: an empty or relative XDG_CACHE_HOME is ignored (a relative one would move with the directory).
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "mia-ptq-bench"


def _lock_file(cache_dir: Path, create: bool):
    if fcntl is None or not (create or Path(cache_dir).is_dir()):
        return None
    path = Path(cache_dir) / LOCK_NAME
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        return open(path, "a+b")
    except OSError:
        pass
    try:  # a lock file another user made: reading is enough to lock it
        return open(path, "rb")
    except OSError:  # a folder this process cannot write: the run's own checks say so, clearly
        return None


@contextlib.contextmanager
def in_use(cache_dir: Path, create: bool = True, waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """Mark the cache as used by this run while the block runs: ``exclusive_use`` (``cache clear``) is
    refused meanwhile. Any number of runs may hold it at once; one starting during a clear waits for it,
    and says so once through ``waiting`` (a clear suspended with Ctrl-Z, or on a slow disk, would
    otherwise hold it without a word).
    ``create``: make the cache folder if it is missing (else a missing one is not locked: a run that
    only reads the cache finds nothing there to protect)."""
    handle = _lock_file(cache_dir, create)
    if handle is None:
        yield
        return
    with handle:
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting is not None:
                    waiting(f"{cache_dir}: a `cache clear` holds this cache; waiting for it to finish")
                fcntl.flock(handle, fcntl.LOCK_SH)
        except OSError:  # a file system without flock (some network mounts): runs go on unguarded
            pass
        yield


@contextlib.contextmanager
def exclusive_use(cache_dir: Path, action: str) -> Iterator[None]:
    """Hold the cache alone while the block runs, or refuse at once if a run is using it."""
    handle = _lock_file(cache_dir, create=False)
    if handle is None:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(f"{cache_dir}: a run (evaluate, reproduce, validate or leaderboard build with --recompute, "
                             f"or a pool pull or push) is using this cache; {action} when it has finished") from None
        except OSError:  # no flock on this file system: as unguarded as the runs
            pass
        yield
