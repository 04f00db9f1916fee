"""Pools on the Hugging Face Hub: push a cached pool, pull one pinned to a commit, verify every file.

A pushed repository holds the pool folder as cached (pool.json, keep.npy, models/, scores/)
plus ``manifest.json``: the task id, pool hash, the pool part of the spec, and the sha256 of
every file. Pulling resolves the revision to a commit hash, checks the pool hash against the
local task and every file against the manifest, and only then installs the files into the
cache, with ``source.json`` recording the repository and commit; results that use the pool
carry both. Offline, pulling works from the Hub library's own cache (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import sha256_file, write_json_atomic
from ..cache import in_use
from ..errors import BenchError, CacheError, SpecError, WriteError
from ..limits import MANIFEST_JSON_BYTES, NPY_HEADER_BYTES, POOL_FILE_BYTES
from ..readers import read_json_file
from ..spec.schema import MAX_EXAMPLES, POOL_FIELDS, TaskSpec
from .build import membership_masks
from .store import SOURCE, PoolStore, other_data

MANIFEST = "manifest.json"


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
    files = pool_files(store)  # an incomplete pool is said to be incomplete, not corrupted
    for problem in filter(None, (store.problem(i) for i in range(store.spec.membership.n_models))):
        raise BenchError(f"refusing to export a corrupted pool: {problem}")
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


def push_pool(store: PoolStore, repo: str, private: bool = False, waiting: Callable[[str], None] | None = None) -> str:
    """Upload the pool to a Hub model repository; returns the commit hash. ``waiting``: told once if a
    `cache clear` holds the cache when the pool is to be read (``cache.in_use``)."""
    from huggingface_hub import HfApi

    api = HfApi()
    where = f"hub {repo}"
    with tempfile.TemporaryDirectory() as staging:
        with in_use(store.cache_dir, [store.spec.id], create=False, waiting=waiting):  # the pool is read while staged
            export_pool(store, Path(staging))
        _hub_call(where, lambda: api.create_repo(repo, repo_type="model", private=private, exist_ok=True), "upload")
        commit = _hub_call(where, lambda: api.upload_folder(
            repo_id=repo, folder_path=staging, repo_type="model",
            commit_message=f"pool of {store.spec.id} ({store.spec.pool_hash[:12]})"), "upload")
    return commit.oid


def expected_files(spec: TaskSpec) -> set[str]:
    """The files a complete pool of ``spec`` consists of, as manifest names (POSIX, relative to the pool)."""
    store = PoolStore(Path("."), spec)
    names = {"pool.json", "keep.npy"}
    for i in range(spec.membership.n_models):
        names |= {p.relative_to(store.root).as_posix()
                  for p in (store.weights_path(i), store.record_path(i), store.scores_path(i))}
    return names


def file_limit(name: str, spec: TaskSpec) -> int:
    """The most bytes the file ``name`` of ``spec``'s pool (or its manifest) may hold."""
    if name == MANIFEST:
        return MANIFEST_JSON_BYTES
    if name.endswith(".npy"):  # the masks hold a byte per model and example, the scores a float64 per example and query
        examples = spec.dataset.pool_size or MAX_EXAMPLES
        return NPY_HEADER_BYTES + examples * (spec.membership.n_models if name == "keep.npy" else 8 * len(spec.queries))
    return POOL_FILE_BYTES[Path(name).suffix]


def _too_large(where: str, name: str, size: int | None, spec: TaskSpec, outcome: str) -> BenchError:
    said = "of unknown size" if size is None else f"{size:,} bytes"
    return BenchError(f"{where}: {name}: {said}, more than it may hold in this task's pool "
                      f"({file_limit(name, spec):,} bytes); {outcome}")


def verify_snapshot(folder: Path, spec: TaskSpec, where: str, data_sha256: str | None = None) -> dict:
    """Check a downloaded pool against the local task and its own manifest; returns the manifest.

    The manifest is the repository owner's: it must list exactly the files of the task's pool, by plain
    relative names (``../../blobs/x``, ``/etc/hostname`` and ``models/../../x`` are refused before any file
    is read), each inside the snapshot, within its size limit and matching its sha256. Matching its own
    manifest says nothing of what a file holds, so the pool's header must name the task's pool and the
    data it was trained on (``data_sha256``, when given, must be it), and its masks must be the task's.
    """
    try:
        manifest = read_json_file(folder / MANIFEST, MANIFEST_JSON_BYTES, max_depth=8)
        files = manifest["files"]
        pool_hash = manifest["pool_hash"]
        if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise TypeError("files must map file names to sha256 digests")
    except (SpecError, KeyError, TypeError) as exc:
        raise BenchError(f"{where}: {MANIFEST}: missing or malformed ({type(exc).__name__}: {exc})") from None
    if pool_hash != spec.pool_hash:
        raise BenchError(f"{where}: {MANIFEST}: pool_hash: the pool was trained for pool {str(pool_hash)[:12]}… "
                         f"({str(manifest.get('task_id'))[:64]}), the local task {spec.id} needs {spec.pool_hash[:12]}…; refused")
    expected = expected_files(spec)
    for name in sorted(files):
        if name not in expected:
            reason = ("is not a plain relative name inside the pool" if not _plain(name) else
                      f"is not a file of the pool of {spec.id} ({spec.membership.n_models} models)")
            raise BenchError(f"{where}: {MANIFEST}: files: {name[:120]!r} {reason}; refused")
    missing = sorted(expected - set(files))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise BenchError(f"{where}: {MANIFEST}: files: {', '.join(missing[:3])}{more} missing: the pool would be "
                         "incomplete; refused")
    repository = folder.resolve().parent.parent  # <cache>/models--org--name: its snapshots/ and blobs/
    for name, expected_sha in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            raise BenchError(f"{where}: {name}: listed in {MANIFEST} but missing; refused")
        if repository not in path.resolve().parents:  # the Hub cache links snapshot files to its blobs/
            raise BenchError(f"{where}: {name}: leads outside the downloaded repository; refused")
        size = path.stat().st_size
        if size > file_limit(name, spec):
            raise _too_large(where, name, size, spec, "refused")
        actual = sha256_file(path)
        if actual != expected_sha:
            raise BenchError(f"{where}: {name}: sha256 {actual[:12]}… does not match the manifest's "
                             f"{str(expected_sha)[:12]}… (tampered or corrupted); refused")
    _check_header(folder, spec, where, data_sha256)
    return manifest


def _check_header(folder: Path, spec: TaskSpec, where: str, data_sha256: str | None) -> None:
    """pool.json names the task's pool and a data hash (``data_sha256`` if given); keep.npy holds the task's masks."""
    try:
        header = read_json_file(folder / "pool.json", file_limit("pool.json", spec), max_depth=8)
    except SpecError as exc:
        raise BenchError(f"{where}: pool.json: {exc}; refused") from None
    if not isinstance(header, dict) or header.get("pool_hash") != spec.pool_hash:
        raise BenchError(f"{where}: pool.json: pool_hash: not the pool {spec.pool_hash[:12]}… of {spec.id}; refused")
    recorded = header.get("data_sha256")
    if not (isinstance(recorded, str) and re.fullmatch(r"[0-9a-f]{64}", recorded)):
        raise BenchError(f"{where}: pool.json: data_sha256: missing or not a sha256, so nothing says which data the "
                         "pool was trained on; refused")
    if data_sha256 is not None and recorded != data_sha256:
        raise BenchError(f"{where}: pool.json: {other_data(header, data_sha256)}; refused")
    try:
        keep = np.load(folder / "keep.npy", allow_pickle=False)
    except (OSError, EOFError, ValueError) as exc:  # EOFError: an empty file
        raise BenchError(f"{where}: keep.npy: unreadable ({exc}); refused") from None
    if not (keep.dtype == np.bool_ and keep.ndim == 2 and keep.shape[0] == spec.membership.n_models
            and np.array_equal(keep, membership_masks(spec, keep.shape[1]))):
        raise BenchError(f"{where}: keep.npy: not the task's membership masks ({keep.dtype} {keep.shape}); refused")


def _plain(name: str) -> bool:
    parts = name.split("/")
    return not name.startswith("/") and "\\" not in name and "\0" not in name and all(p not in ("", ".", "..") for p in parts)


def pull_pool(spec: TaskSpec, cache_dir: Path, repo: str, revision: str | None = None,
              data_sha256: str | None = None, waiting: Callable[[str], None] | None = None) -> PoolSource:
    """Download (or find in the Hub cache), verify, and install a pool; returns where it came from.

    Online, one listing of the repository at the requested revision gives its commit and every
    file's size: each pool file is checked against its limit before anything is fetched, and then
    only the pool's own files are fetched, at that commit. Offline (HF_HUB_OFFLINE=1) the Hub
    cache's files are used, checked on disk. ``data_sha256``: the local data's
    (``ImageDataset.digest``), checked before anything local is replaced. ``waiting``: as
    ``install_snapshot``'s.
    """
    import huggingface_hub.constants as constants
    from huggingface_hub import HfApi, snapshot_download

    where = f"hub {repo}@{revision or 'main'}"
    wanted = [MANIFEST, *sorted(expected_files(spec))]  # plain names: no pattern characters
    offline = bool(getattr(constants, "HF_HUB_OFFLINE", False))
    unreachable = None
    if not offline:
        try:
            info = _hub_call(where, lambda: HfApi().model_info(repo, revision=revision, files_metadata=True))
        except BenchError as exc:  # no listing (no network, say): the Hub cache only, as offline
            unreachable, offline = exc, True
        else:
            sizes = {sibling.rfilename: sibling.size for sibling in info.siblings or []}
            for name in wanted:
                if name in sizes and (sizes[name] is None or sizes[name] > file_limit(name, spec)):
                    raise _too_large(where, name, sizes[name], spec, "not downloaded")
            revision = info.sha  # fetch exactly the commit whose sizes were checked
    try:
        snapshot = _hub_call(where, lambda: snapshot_download(repo, repo_type="model", revision=revision,
                                                             allow_patterns=wanted, local_files_only=offline))
    except BenchError as exc:
        raise (unreachable or exc) from None
    return install_snapshot(Path(snapshot), spec, cache_dir, repo, data_sha256, waiting)


def _hub_call(where: str, call, action: str = "download"):
    """``call()``, with the Hub client's failures (network, HTTP, its cache: no common base class) as one BenchError."""
    try:
        return call()
    except (TypeError, AttributeError, NameError):  # this code's mistakes, not the Hub's
        raise
    except Exception as exc:
        reason = " ".join(str(exc).split())[:300]
        raise BenchError(f"{where}: cannot {action} the pool ({type(exc).__name__}: {reason})") from None


def install_snapshot(snapshot: Path, spec: TaskSpec, cache_dir: Path, repo: str,
                     data_sha256: str | None = None, waiting: Callable[[str], None] | None = None) -> PoolSource:
    """Verify a snapshot folder of the Hub cache and install its pool into the cache: whole, or nothing.

    A pool already there (say, a partly trained one) is replaced only once the new one is verified and
    copied, and is set aside, not deleted, until the new one is in place. ``waiting``: told once if a
    `cache clear` holds the cache when the pool is to be written (``cache.in_use``).
    """
    commit = snapshot.name  # the Hub cache names each snapshot by its commit hash
    where = f"hub {repo}@{commit[:12]}"
    manifest = verify_snapshot(snapshot, spec, where, data_sha256)
    with in_use(Path(cache_dir), [spec.id], waiting=waiting):  # verified: from here the pool is written into the cache
        return _install(snapshot, manifest, PoolStore(cache_dir, spec), repo, commit)


def _install(snapshot: Path, manifest: dict, store: PoolStore, repo: str, commit: str) -> PoolSource:
    try:
        store.root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".pull-", dir=store.root.parent))
    except OSError as exc:
        raise WriteError(f"{store.root.parent}: cannot write the pool: {exc.strerror or exc}") from None
    aside = staging.with_name(staging.name.replace(".pull-", ".replaced-", 1))
    try:
        for name in manifest["files"]:  # plain names of the pool's own files: verified above
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(snapshot / name, staging / name)
        write_json_atomic(staging / SOURCE, {"repo": repo, "revision": commit})
        if store.root.exists():
            store.root.rename(aside)
        try:
            staging.rename(store.root)  # the pool appears whole or not at all
        except BaseException:
            if aside.exists() and not store.root.exists():
                aside.rename(store.root)  # the old pool back, as it was
            raise
    except WriteError:
        raise
    except OSError as exc:
        kept = f"; the pool it replaces is in {aside}" if aside.exists() else ""
        raise WriteError(f"{store.root}: cannot install the pool: {exc.strerror or exc}{kept}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)
    return PoolSource(repo, commit)


def pool_source(store: PoolStore) -> PoolSource | None:
    path = store.root / SOURCE
    if not path.is_file():
        return None
    info = PoolStore.read_record(path)
    if not (isinstance(info.get("repo"), str) and isinstance(info.get("revision"), str)):
        raise CacheError(f"{path}: unreadable cache record (no repo and revision); delete it, or the pool, to "
                         "pull it again")
    return PoolSource(info["repo"], info["revision"])
