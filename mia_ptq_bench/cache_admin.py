"""``mptq-bench cache list|clear``: what the cache holds, and removing it safely.

Layout under the cache folder ($MPTQ_CACHE or ~/.cache/mia-ptq-bench)::

    pools/<task>-<pool hash[:12]>/          one pool (see pool/store.py): pool.json, keep.npy,
                                            models/model-NNNN.{safetensors,json}, scores/model-NNNN.npy,
                                            source.json when the pool was pulled from the Hub
    quantized/<pool folder>/<quantizer>-<config hash[:12]>/<plan>-cal<calibration hash[:8]>[-n<count>]-env<environment hash[:8]>-v<format>/model-NNNN.npz
                                            one quantized model's scores, test predictions, audit and
                                            weights, with the whole key it was made under (checked on reading)
    .reproduce-<host>-<pid>-<random>/       `mptq-bench reproduce`'s scratch outputs while it runs (it
                                            quantizes afresh); one whose process is gone from this host
                                            was killed, and goes at the next reproduce or `cache clear`

    .in-use.lock                            locked (shared, flock) by every run using the cache; clear
                                            takes it exclusively, and is refused while a run holds it
    .in-use.<task>.lock                     locked (shared) by every run of the task; clear --task takes it
                                            exclusively (and .in-use.lock shared), so that it is refused
                                            only while a run of that task, or a whole clear, holds them
                                            (until a run of the task has made the file, while any run does)

Every key is a content hash, every write atomic, every read checked; deleting any part only
costs recomputing it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from .atomic import another_live_process, is_temporary
from .cache import exclusive_use
from .errors import CacheError
from .spec.schema import NAME_LENGTH, NAME_PATTERN


@dataclass(frozen=True)
class CacheEntry:
    kind: str  # "pool", "quantized" or "scratch"
    path: Path
    task: str
    detail: str
    files: int
    bytes: int
    removable: bool = True  # False for a scratch folder some run may still be using


def _size(folder: Path) -> tuple[int, int]:
    """Files and bytes under ``folder``, never following a symbolic link (a link counts as itself)."""
    files, size = 0, 0
    for root, _, names in os.walk(folder, followlinks=False):
        for name in names:
            try:
                size += (Path(root) / name).lstat().st_size
                files += 1
            except OSError:
                continue
    return files, size


def _children(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder`` by name; none if it is missing (or itself a link below the cache's kinds)."""
    try:
        with os.scandir(folder) as listing:
            return sorted(listing, key=lambda e: e.name)
    except OSError:  # missing, not a folder, or unreadable: nothing the cache can list there
        return []


def _link(kind: str, entry: os.DirEntry, pool_folder: str) -> CacheEntry:
    """A symbolic link where the cache keeps folders: not followed, listed (under the task its pool folder
    names) so that clear removes the link only."""
    return CacheEntry(kind, Path(entry.path), pool_folder.rsplit("-", 1)[0],
                      f"a symbolic link (to {os.readlink(entry.path)}), not followed", 1, 0)


# `reproduce`'s scratch folder in the cache (reproduce.py) is named after the machine and the process that
# made it, which tell a running one from one a killed run left: .reproduce-<host>-<pid>-<8 random characters>.
SCRATCH_PREFIX = ".reproduce-"
_SCRATCH_NAME = re.compile(r"^\.reproduce-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]{8}$")


def scratch_prefix() -> str:
    """The name this process's scratch folder starts with (tempfile adds the 8 random characters)."""
    return f"{SCRATCH_PREFIX}{socket.gethostname()}-{os.getpid()}-"


@dataclass(frozen=True)
class _Scratch:
    path: Path
    host: str
    pid: int

    @property
    def stale(self) -> bool:
        """Left by a killed run: made on this machine by a process that is gone. (A folder from another
        machine sharing the cache is never judged from here.)"""
        return self.host == socket.gethostname() and not another_live_process(self.pid)


def _scratch_folders(cache_dir: Path) -> list[_Scratch]:
    found = ((entry, _SCRATCH_NAME.match(entry.name)) for entry in _children(Path(cache_dir)))
    return [_Scratch(Path(entry.path), match["host"], int(match["pid"])) for entry, match in found
            if match is not None and entry.is_dir(follow_symlinks=False)]


def remove_stale_scratch(cache_dir: Path) -> None:
    """Delete the scratch folders killed reproduce runs left in the cache (a running one's stay)."""
    for scratch in _scratch_folders(cache_dir):
        if scratch.stale:
            shutil.rmtree(scratch.path, ignore_errors=True)


def _scratch_detail(scratch: _Scratch, stale: bool) -> str:
    if stale:
        return "left by an interrupted reproduce: safe to delete"
    if scratch.host != socket.gethostname():
        return f"scratch of a reproduce on {scratch.host} (process {scratch.pid}), not checked from here"
    return f"scratch of a running reproduce (process {scratch.pid})"


def list_cache(cache_dir: Path) -> list[CacheEntry]:
    entries = []
    for scratch in _scratch_folders(cache_dir):
        files, size = _size(scratch.path)
        stale = scratch.stale  # one look at its process, for what the listing says and what clear may remove
        entries.append(CacheEntry("scratch", scratch.path, "", _scratch_detail(scratch, stale), files, size, stale))
    for found in _children(Path(cache_dir) / "pools"):
        if found.is_symlink():
            entries.append(_link("pool", found, found.name))
            continue
        if not found.is_dir(follow_symlinks=False):
            continue
        pool = Path(found.path)
        if pool.name.startswith("."):  # pool/hub.py's staging (.pull-*) or a replaced pool set aside (.replaced-*)
            files, size = _size(pool)
            entries.append(CacheEntry("pool", pool, "", "left by an interrupted pull: safe to delete", files, size))
            continue
        # The task is the folder's (<task id>-<pool hash>), as runs name and lock it: a pulled pool.json
        # may carry the id of the task that pushed it.
        task = pool.name.rsplit("-", 1)[0]
        try:
            n_models = int(json.loads((pool / "pool.json").read_text())["spec"]["membership"]["n_models"])
        except (OSError, ValueError, KeyError, TypeError):
            n_models = 0
        done = len(list((pool / "models").glob("*.json")))
        source = pool / "source.json"
        try:
            origin = f", pulled from {json.loads(source.read_text()).get('repo')}" if source.is_file() else ""
        except (OSError, ValueError, AttributeError):
            origin = ", pulled (source.json unreadable)"
        files, size = _size(pool)
        entries.append(CacheEntry("pool", pool, task, f"{done}/{n_models} models{origin}", files, size))
    # quantized/<pool folder>/<quantizer>/<plan>: three levels, none of them entered through a link
    # (pools/ and quantized/ themselves are followed if they are links: where the cache keeps them is the user's)
    levels = [[Path(cache_dir) / "quantized"]]
    for depth in range(3):
        below = []
        for folder in levels[-1]:
            for found in _children(folder):
                if found.is_symlink():
                    pool_folder = found.name if depth == 0 else Path(found.path).parents[depth - 1].name
                    entries.append(_link("quantized", found, pool_folder))
                elif found.is_dir(follow_symlinks=False):
                    below.append(Path(found.path))
        levels.append(below)
    for plan in levels[-1]:
        files, size = _size(plan)
        models = sum(1 for e in _children(plan) if e.name.endswith(".npz") and not is_temporary(e.name))
        task = plan.parent.parent.name.rsplit("-", 1)[0]
        entries.append(CacheEntry("quantized", plan, task, f"{plan.parent.name} {plan.name}: {models} models",
                                  files, size))
    return entries


def clear_cache(cache_dir: Path, kind: str = "all", task: str | None = None) -> list[CacheEntry]:
    """Remove cached work of ``kind`` (pool, quantized, scratch, all), optionally of one task; returns what went.

    Scratch belongs to no task, and only a killed run's goes: a running reproduce's is left to it."""
    if kind == "scratch" and task is not None:
        raise CacheError("reproduce's scratch folders belong to no task: clear them without --task")
    if task is not None and not (re.fullmatch(NAME_PATTERN, task) and len(task) <= NAME_LENGTH):
        raise CacheError(f"--task {task!r}: not a task id (lowercase letters, digits, '.' and '-', starting with a "
                         f"letter or digit, at most {NAME_LENGTH} characters)")
    folder = Path(cache_dir)
    if not ((folder / "pools").is_dir() or (folder / "quantized").is_dir() or _scratch_folders(folder)):
        return []  # no cached work: no lock file left in a folder that is not a cache
    if task is not None and not _holds_task(folder, task):
        return []  # nothing of the task's: no lock to take, and no lock file left for a task the cache never held
    # Scratch: only killed runs' folders go, which no running run reads, so runs need not have ended.
    with contextlib.nullcontext() if kind == "scratch" else exclusive_use(cache_dir, "clear it", task):
        return _remove(list_cache(cache_dir), kind, task)


def _holds_task(cache_dir: Path, task: str) -> bool:
    """Whether a pool folder of ``task`` (<task>-<pool hash>) is in pools/ or quantized/: by name only,
    without sizing every entry as list_cache does."""
    return any(not entry.name.startswith(".") and entry.name.rsplit("-", 1)[0] == task
               for kind in ("pools", "quantized") for entry in _children(cache_dir / kind))


def _remove(entries: list[CacheEntry], kind: str, task: str | None) -> list[CacheEntry]:
    removed = []
    for entry in entries:
        if entry.kind == "scratch" and (task is not None or not entry.removable):
            continue
        if (kind in ("all", entry.kind)) and (task is None or entry.task == task):
            try:
                if entry.path.is_symlink():  # the link only: what it points to is not the cache's
                    entry.path.unlink()
                else:
                    shutil.rmtree(entry.path)
            except OSError as exc:
                raise CacheError(f"{entry.path}: cannot remove it: {exc.strerror or exc}"
                                 f"{f' (after removing {len(removed)} entries)' if removed else ''}") from None
            removed.append(entry)
    return removed
