"""Pools on the Hugging Face Hub: push a cached pool, pull one pinned to a commit, verify every file.

A pushed repository holds the pool folder as cached (pool.json, keep.npy, models/, scores/)
plus ``manifest.json``: the task id, pool hash, the pool part of the spec, and the sha256 of
every file. Pulling resolves the revision to a commit hash, checks the pool hash against the
local task and every file against the manifest, and only then installs the files into the
cache, with ``source.json`` recording the repository and commit; results that use the pool
carry both. Offline, pulling works from the Hub library's own cache (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..atomic import sha256_file, write_json_atomic
from ..errors import BenchError
from ..spec.schema import POOL_FIELDS, TaskSpec
from .store import PoolStore

MANIFEST = "manifest.json"
SOURCE = "source.json"


@dataclass(frozen=True)
class PoolSource:
    repo: str
    revision: str  # a commit hash


def pool_files(store: PoolStore) -> list[Path]:
    """Every file of a complete pool, relative to its folder (source.json is local bookkeeping)."""
    n_models = store.spec.membership.n_models
    missing = [i for i in range(n_models) if not store.is_complete(i)]
    if missing:
        raise BenchError(f"{store.root}: the pool is incomplete (models {missing[:5]}{'…' if len(missing) > 5 else ''} "
                         "missing); build it with `mptq-bench evaluate` first")
    files = [Path("pool.json"), Path("keep.npy")]
    for i in range(n_models):
        files += [p.relative_to(store.root) for p in (store.weights_path(i), store.record_path(i), store.scores_path(i))]
    return files


def export_pool(store: PoolStore, folder: Path) -> Path:
    """Write the pool and its manifest into ``folder``: exactly what is uploaded."""
    for problem in filter(None, (store.problem(i) for i in range(store.spec.membership.n_models))):
        raise BenchError(f"refusing to export a corrupted pool: {problem}")
    files = pool_files(store)
    for relative in files:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(store.root / relative, folder / relative)
    dumped = store.spec.model_dump(mode="json")
    write_json_atomic(folder / MANIFEST, {
        "task_id": store.spec.id, "pool_hash": store.spec.pool_hash,
        "spec": {key: dumped[key] for key in POOL_FIELDS},
        "files": {str(relative): sha256_file(folder / relative) for relative in files},
    })
    return folder


def push_pool(store: PoolStore, repo: str, private: bool = False) -> str:
    """Upload the pool to a Hub model repository; returns the commit hash."""
    from huggingface_hub import HfApi

    api = HfApi()
    with tempfile.TemporaryDirectory() as staging:
        export_pool(store, Path(staging))
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo, folder_path=staging, repo_type="model",
                                   commit_message=f"pool of {store.spec.id} ({store.spec.pool_hash[:12]})")
    return commit.oid


def verify_snapshot(folder: Path, spec: TaskSpec, where: str) -> dict:
    """Check a downloaded pool against the local task and its own manifest; returns the manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        pool_hash = manifest["pool_hash"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"{where}: {MANIFEST}: missing or malformed ({type(exc).__name__}: {exc})") from None
    if pool_hash != spec.pool_hash:
        raise BenchError(f"{where}: {MANIFEST}: pool_hash: the pool was trained for pool {pool_hash[:12]}… "
                         f"({manifest.get('task_id')}), the local task {spec.id} needs {spec.pool_hash[:12]}…; refused")
    for name, expected in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            raise BenchError(f"{where}: {name}: listed in {MANIFEST} but missing; refused")
        actual = sha256_file(path)
        if actual != expected:
            raise BenchError(f"{where}: {name}: sha256 {actual[:12]}… does not match the manifest's "
                             f"{expected[:12]}… (tampered or corrupted); refused")
    return manifest


def pull_pool(spec: TaskSpec, cache_dir: Path, repo: str, revision: str | None = None) -> PoolSource:
    """Download (or find in the Hub cache), verify, and install a pool; returns where it came from."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo, repo_type="model", revision=revision))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        raise BenchError(f"hub {repo}@{revision or 'main'}: cannot download the pool: {exc}") from None
    commit = snapshot.name  # the Hub cache names each snapshot by its commit hash
    where = f"hub {repo}@{commit[:12]}"
    manifest = verify_snapshot(snapshot, spec, where)
    store = PoolStore(cache_dir, spec)
    store.root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pull-", dir=store.root.parent))
    try:
        for name in manifest["files"]:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(snapshot / name, staging / name)
        write_json_atomic(staging / SOURCE, {"repo": repo, "revision": commit})
        if store.root.exists():
            shutil.rmtree(store.root)
        staging.rename(store.root)  # the pool appears whole or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PoolSource(repo, commit)


def pool_source(store: PoolStore) -> PoolSource | None:
    path = store.root / SOURCE
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    return PoolSource(info["repo"], info["revision"])
