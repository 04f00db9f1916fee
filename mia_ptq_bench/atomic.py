"""Atomic file writes and content hashes.

Every file the benchmark writes goes through here: written to a temporary file in
the same folder, flushed, then renamed over the target (and the folder flushed), so a
reader (or a rerun after a crash) sees either the old file or the whole new one, never half.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import WriteError


TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # what mkstemp below names: .<name>.<8 chars>.tmp


def is_temporary(name: str) -> bool:
    """A temporary file of ``write_atomic``: left behind only when a writer was killed (kill -9) mid-write."""
    return bool(TEMPORARY.match(name))


def write_atomic(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` whole or not at all; a full disk or a read-only folder is one WriteError naming the file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise WriteError(f"{path}: cannot write: {_reason(exc)}") from None
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(f"{path}: cannot write: {_reason(exc)}") from None
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Flush the folder's entry for the rename too, so that a power cut after a write cannot bring back the
    old file or none; best effort: where a folder cannot be opened (Windows) or synced, the write stands."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def ensure_writable(folder: Path, what: str) -> None:
    """Fail now, not after hours of compute, when ``folder`` (or the folder it would be made in) cannot be written.

    Creates nothing that stays: a probe file in the nearest existing folder is made and removed.
    """
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise WriteError(f"{folder}: {what}: {existing} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", suffix=".tmp", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise WriteError(f"{folder}: {what}: cannot write in {existing}: {_reason(exc)}") from None


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def temporary_folder(prefix: str, parent: Path) -> Path:
    """A new uniquely named folder in ``parent`` with the permissions mkdir would give it (mkdtemp makes 0700)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(folder, 0o777 & ~_UMASK)
    return folder


def another_live_process(pid: int) -> bool:
    """Whether process ``pid`` is alive on this machine and is not this one (whose own work folders, if
    any carry its id, were left by an earlier process that had the same id)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, OSError):  # PermissionError among them
        return True  # alive under another user, or not ours to judge: leave it
    return True


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda handle: handle.write(data))


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A compressed .npz (what ``np.savez_compressed`` writes) whose bytes depend only on the arrays.

    numpy stamps each member with the current time, so two runs that compute identical arrays
    would write different files (and different sha256 in the results); a fixed timestamp
    makes equal arrays give equal bytes.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, value in arrays.items():
            member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            member.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(member, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.asanyarray(value), allow_pickle=False)
    return buffer.getvalue()


def write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    write_bytes_atomic(path, npz_bytes(arrays))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_json(obj: Any) -> str:
    """The one serialisation that content hashes are taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def arrays_sha256(head: str, arrays: list[tuple[str, np.ndarray]]) -> str:
    """sha256 of ``head`` and each named array's dtype, shape and bytes: a memo key for what was computed from them."""
    digest = hashlib.sha256(head.encode())
    for name, array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"|{name}:{array.dtype.str}{array.shape}|".encode())
        digest.update(array)
    return digest.hexdigest()


def content_hash(obj: Any) -> str:
    return sha256_bytes(canonical_json(obj).encode("ascii"))


def quantizer_config_hash(name: str, version: str, config: dict) -> str:
    """What a result records as its quantizer's ``config_hash`` (and ``validate`` recomputes)."""
    return content_hash({"name": name, "version": version, "config": config})
