"""``mptq-bench cache list|clear``: what the cache holds, and removing it safely.

Layout under the cache folder ($MPTQ_CACHE or ~/.cache/mia-ptq-bench)::

    pools/<task>-<pool hash[:12]>/          one pool (see pool/store.py): pool.json, keep.npy,
                                            models/model-NNNN.{safetensors,json}, scores/model-NNNN.npy,
                                            source.json when the pool was pulled from the Hub
    quantized/<pool folder>/<quantizer>-<config hash[:12]>/<plan>-cal<calibration hash[:8]>/model-NNNN.npz
                                            one quantized model's scores, test predictions and audit

Every key is a content hash, every write atomic, every read checked; deleting any part only
costs recomputing it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import CacheError


@dataclass(frozen=True)
class CacheEntry:
    kind: str  # "pool" or "quantized"
    path: Path
    task: str
    detail: str
    files: int
    bytes: int


def _size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def list_cache(cache_dir: Path) -> list[CacheEntry]:
    entries = []
    for pool in sorted((Path(cache_dir) / "pools").glob("*")):
        if not pool.is_dir():
            continue
        if pool.name.startswith("."):  # pool/hub.py's staging (.pull-*) or a replaced pool set aside (.replaced-*)
            files, size = _size(pool)
            entries.append(CacheEntry("pool", pool, "", "left by an interrupted pull: safe to delete", files, size))
            continue
        try:
            info = json.loads((pool / "pool.json").read_text())
            n_models = int(info["spec"]["membership"]["n_models"])
            task = info["task_id"]
        except (OSError, ValueError, KeyError, TypeError):
            n_models, task = 0, pool.name
        done = len(list((pool / "models").glob("*.json")))
        source = pool / "source.json"
        try:
            origin = f", pulled from {json.loads(source.read_text()).get('repo')}" if source.is_file() else ""
        except (OSError, ValueError, AttributeError):
            origin = ", pulled (source.json unreadable)"
        files, size = _size(pool)
        entries.append(CacheEntry("pool", pool, task, f"{done}/{n_models} models{origin}", files, size))
    for plan in sorted((Path(cache_dir) / "quantized").glob("*/*/*")):
        if plan.is_dir():
            files, size = _size(plan)
            task = plan.parent.parent.name.rsplit("-", 1)[0]
            entries.append(CacheEntry("quantized", plan, task, f"{plan.parent.name} {plan.name}: {files} models",
                                      files, size))
    return entries


def clear_cache(cache_dir: Path, kind: str = "all", task: str | None = None) -> list[CacheEntry]:
    """Remove cached work of ``kind`` (pool, quantized, all), optionally of one task; returns what went."""
    removed = []
    for entry in list_cache(cache_dir):
        if (kind in ("all", entry.kind)) and (task is None or entry.task == task):
            try:
                shutil.rmtree(entry.path)
            except OSError as exc:
                raise CacheError(f"{entry.path}: cannot remove it: {exc.strerror or exc}"
                                 f"{f' (after removing {len(removed)} entries)' if removed else ''}") from None
            removed.append(entry)
    return removed
