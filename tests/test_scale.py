"""Sharing and scaling: pools through the real Hugging Face Hub client, Ray, and surviving SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import TASKS, needed
from mia_ptq_bench.data import load_dataset
from mia_ptq_bench.pool import PoolStore, build_pool
from mia_ptq_bench.atomic import sha256_file
from mia_ptq_bench.errors import BenchError
from mia_ptq_bench.pool.hub import MANIFEST, export_pool, install_snapshot
from mia_ptq_bench.results.io import load_result
from mia_ptq_bench.runner import RunOptions, evaluate
from mia_ptq_bench.spec import load_task

VOLATILE = ("started_at", "finished_at", "seconds", "arrays", "environment")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def numbers(path: Path) -> dict:
    document = json.loads(Path(path).read_text())
    for key in VOLATILE:
        document.pop(key)
    return document


def cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mia_ptq_bench.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200", **(env or {})}, cwd=cwd, timeout=timeout)


# -- the Hub ----------------------------------------------------------------------------------

@pytest.fixture
def hub_cache(tmp_path: Path) -> dict:
    """A tiny pool trained here, published into the Hub library's real cache layout (as a download leaves it)."""
    spec = load_task("tiny-digits")
    build_pool(spec, load_dataset(spec.dataset), tmp_path / "origin")
    hf_home = tmp_path / "hf"
    repo = hf_home / "hub" / "models--mptq--tiny-digits-pool"
    export_pool(PoolStore(tmp_path / "origin", spec), repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)  # no trailing newline, as the library writes it
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "MPTQ_TASKS": str(TASKS),
            "snapshot": repo / "snapshots" / COMMIT}


@pytest.mark.slow
def test_pool_pull_verifies_and_evaluate_uses_it(hub_cache: dict, tmp_path: Path) -> None:
    env = {k: v for k, v in hub_cache.items() if k != "snapshot"}
    pulled = cli("pool", "pull", "tiny-digits", "--repo", "mptq/tiny-digits-pool", "--cache-dir", str(tmp_path / "c"),
                 env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert f"at commit {COMMIT}" in pulled.stdout
    # A task that names the repository evaluates on the pulled pool, in a fresh cache, without training.
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    spec = yaml.safe_load((TASKS / "tiny-digits.yaml").read_text())
    spec["hub"] = {"repo": "mptq/tiny-digits-pool", "revision": COMMIT}
    (tasks / "tiny-digits.yaml").write_text(yaml.safe_dump(spec))
    run = cli("evaluate", "rtn", "--task", "tiny-digits", "--plans", "w4", "--threat-models", "oblivious",
              "--cache-dir", str(tmp_path / "fresh"), "--out", str(tmp_path / "r"), env={**env, "MPTQ_TASKS": str(tasks)})
    assert run.returncode == 0, run.stderr
    assert "pulling the pool from the Hub: mptq/tiny-digits-pool" in run.stdout
    result = load_result(tmp_path / "r" / "tiny-digits" / "rtn" / "w4--oblivious.json")
    assert result.pool_source is not None and result.pool_source.revision == COMMIT
    # the pulled pool is the trained one, bit for bit
    origin = PoolStore(tmp_path.parent / tmp_path.name / "origin", load_task("tiny-digits"))
    fresh = PoolStore(tmp_path / "fresh", load_task("tiny-digits"))
    assert all(np.array_equal(origin.load_scores(i), fresh.load_scores(i)) for i in range(8))


@pytest.mark.slow
def test_tampered_hub_file_is_refused(hub_cache: dict, tmp_path: Path) -> None:
    weights = hub_cache["snapshot"] / "models" / "model-0003.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    env = {k: v for k, v in hub_cache.items() if k != "snapshot"}
    pulled = cli("pool", "pull", "tiny-digits", "--repo", "mptq/tiny-digits-pool", "--cache-dir", str(tmp_path / "c"),
                 env=env)
    assert pulled.returncode == 2
    assert "models/model-0003.safetensors: sha256" in pulled.stderr and "tampered or corrupted); refused" in pulled.stderr
    assert not (tmp_path / "c" / "pools").exists() or not any((tmp_path / "c" / "pools").iterdir())


@pytest.mark.slow
def test_pool_of_another_task_is_refused(hub_cache: dict, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "tiny-digits.yaml").write_text((TASKS / "tiny-digits.yaml").read_text().replace("epochs: 4", "epochs: 5"))
    env = {k: v for k, v in hub_cache.items() if k != "snapshot"}
    pulled = cli("pool", "pull", "tiny-digits", "--repo", "mptq/tiny-digits-pool", "--cache-dir", str(tmp_path / "c"),
                 env={**env, "MPTQ_TASKS": str(other)})
    assert pulled.returncode == 2 and "manifest.json: pool_hash: the pool was trained for pool" in pulled.stderr


def test_export_manifest_lists_every_file(hub_cache: dict) -> None:
    manifest = json.loads((hub_cache["snapshot"] / MANIFEST).read_text())
    files = {str(p.relative_to(hub_cache["snapshot"])) for p in hub_cache["snapshot"].rglob("*")
             if p.is_file() and p.name != MANIFEST}
    assert set(manifest["files"]) == files and len(files) == 2 + 3 * 8
    assert manifest["task_id"] == "tiny-digits" and manifest["spec"]["training"]["epochs"] == 4


# -- Ray --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ray_executor_gives_identical_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ray = needed("ray", "Ray not installed: pip install -e '.[ray]'")
    from mia_ptq_bench.executor import RayExecutor

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    spec = load_task("tiny-cnn")
    local = evaluate("rtn", spec, options=RunOptions(out_dir=tmp_path / "local", cache_dir=tmp_path / "cache-local"))
    try:
        executor = RayExecutor(num_cpus=2)
        distributed = evaluate("rtn", spec, options=RunOptions(out_dir=tmp_path / "ray", cache_dir=tmp_path / "cache-ray",
                                                               executor=executor))
    finally:
        ray.shutdown()
    for a, b in zip(local.paths, distributed.paths, strict=True):
        assert numbers(a) == numbers(b)
    assert np.array_equal(local.pool.scores, distributed.pool.scores)


@pytest.mark.slow
def test_ray_failures_are_reported_not_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    ray = needed("ray", "Ray not installed: pip install -e '.[ray]'")
    from mia_ptq_bench.errors import BenchError
    from mia_ptq_bench.executor import RayExecutor

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray", dir="/tmp"))

    def square(x: int) -> int:  # defined here so that Ray ships it by value to its workers
        return x * x

    def fails_on_two(x: int) -> int:
        if x == 2:
            raise ValueError("two is bad")
        return x

    try:
        executor = RayExecutor(num_cpus=2, max_retries=1)
        assert executor.map(square, [1, 2, 3]) == [1, 4, 9]
        with pytest.raises(BenchError, match=r"1 of 3 Ray tasks failed after 1 retries: job 2: ValueError: two is bad"):
            executor.map(fails_on_two, [1, 2, 3], describe=lambda j: f"job {j}")
    finally:
        ray.shutdown()


# -- SIGKILL ------------------------------------------------------------------------------------

def _run_and_kill(args: list[str], env: dict, watch: Path, pattern: str, after: int) -> None:
    """Start ``mptq-bench`` and SIGKILL it once ``after`` files matching ``pattern`` exist under ``watch``."""
    process = subprocess.Popen([sys.executable, "-m", "mia_ptq_bench.cli", *args], env={**os.environ, **env},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if len(list(watch.rglob(pattern))) >= after:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"the run ended (or hung) before {after} files matched {pattern}: nothing was interrupted")


KILL_ENV = {"MPTQ_TASKS": str(TASKS)}
KILL_ARGS = ["evaluate", "adaround", "--task", "kill-cnn", "--set", "iters=150"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run of ``KILL_ARGS`` that nobody kills: its cache (``cache``) and results (``results``).

    The tests below compare interrupted runs with it; they share it because it is the slowest part of each.
    """
    root = tmp_path_factory.mktemp("uninterrupted")
    reference = cli(*KILL_ARGS, "--cache-dir", str(root / "cache"), "--out", str(root / "results"), env=KILL_ENV)
    assert reference.returncode == 0, reference.stderr
    assert len(list((root / "results").rglob("*.json"))) == 4
    return root


def assert_same_results(first: Path, second: Path) -> None:
    paths = sorted(first.rglob("*.json"))
    assert paths
    for path in paths:
        assert numbers(path) == numbers(second / path.relative_to(first))


@pytest.mark.slow
@pytest.mark.xdist_group("uninterrupted")
@pytest.mark.parametrize("stage, pattern, after", [("pool", "model-*.json", 2), ("quantization", "model-*.npz", 6)])
def test_sigkill_then_rerun_gives_identical_results(uninterrupted: Path, tmp_path: Path, stage: str, pattern: str,
                                                    after: int) -> None:
    cache = tmp_path / "cache"
    if stage == "quantization":  # start where the uninterrupted run's pool left off: only quantization is killed
        shutil.copytree(uninterrupted / "cache" / "pools", cache / "pools")
    watch = cache / ("pools" if stage == "pool" else "quantized")
    _run_and_kill([*KILL_ARGS, "--cache-dir", str(cache), "--out", str(tmp_path / "results")], KILL_ENV, watch,
                  pattern, after)
    for written in (tmp_path / "results").rglob("*.json"):  # results of plans finished before the kill are whole
        load_result(written)
    rerun = cli(*KILL_ARGS, "--cache-dir", str(cache), "--out", str(tmp_path / "results"), env=KILL_ENV)
    assert rerun.returncode == 0, rerun.stderr
    assert_same_results(uninterrupted / "results", tmp_path / "results")


@pytest.mark.slow
@pytest.mark.xdist_group("uninterrupted")
def test_truncated_cache_file_is_detected_and_rebuilt(uninterrupted: Path, tmp_path: Path) -> None:
    shutil.copytree(uninterrupted / "cache" / "pools", tmp_path / "cache" / "pools")
    args = ["evaluate", "rtn", "--task", "kill-cnn", "--cache-dir", str(tmp_path / "cache")]
    first = cli(*args, "--out", str(tmp_path / "r1"), env=KILL_ENV)
    assert first.returncode == 0, first.stderr
    weights = next((tmp_path / "cache" / "pools").rglob("model-0004.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    second = cli(*args, "--out", str(tmp_path / "r2"), env=KILL_ENV)
    assert second.returncode == 0 and "rebuilding model 4" in second.stdout and "model-0004.safetensors" in second.stdout
    assert_same_results(tmp_path / "r1", tmp_path / "r2")


# -- the Hub manifest is the repository owner's: hostile until checked --------------------------------

def _rewrite_manifest(snapshot: Path, change) -> None:
    manifest = json.loads((snapshot / MANIFEST).read_text())
    change(manifest["files"])
    (snapshot / MANIFEST).write_text(json.dumps(manifest))


def _nothing_installed(cache: Path) -> bool:
    return not (cache / "pools").exists() or not any(p for p in (cache / "pools").iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize("name", ["../../blobs/evilblob", "models/../../../blobs/evilblob", "/tmp/evilblob",
                                  "../../../../../../../../etc/hostname",
                                  "models/./model-0000.json", "models\\evil"])
def test_manifest_names_must_be_plain_files_of_the_pool(hub_cache: dict, tmp_path: Path, name: str) -> None:
    snapshot = hub_cache["snapshot"]
    blob = snapshot.parent.parent / "blobs" / "evilblob"  # a real file with the right sha256: the old pull installed it
    blob.parent.mkdir(exist_ok=True)
    blob.write_bytes(b"not a pool file")
    _rewrite_manifest(snapshot, lambda files: files.update({name: sha256_file(blob)}))
    with pytest.raises(BenchError) as info:
        install_snapshot(snapshot, load_task("tiny-digits"), tmp_path / "cache", "mptq/tiny-digits-pool")
    assert str(info.value) == (f"hub mptq/tiny-digits-pool@{COMMIT[:12]}: {MANIFEST}: files: {name!r} is not a plain "
                               "relative name inside the pool; refused")
    assert _nothing_installed(tmp_path / "cache") and not (tmp_path / "cache" / "blobs").exists()


def test_manifest_must_list_exactly_the_pool(hub_cache: dict, tmp_path: Path) -> None:
    snapshot, spec, cache = hub_cache["snapshot"], load_task("tiny-digits"), tmp_path / "cache"
    _rewrite_manifest(snapshot, lambda files: files.pop("models/model-0007.safetensors"))  # an incomplete pool
    with pytest.raises(BenchError, match=r"files: models/model-0007\.safetensors missing: the pool would be "
                                         r"incomplete; refused"):
        install_snapshot(snapshot, spec, cache, "mptq/tiny-digits-pool")
    assert _nothing_installed(cache)
    _rewrite_manifest(snapshot, lambda files: files.update({"models/model-0007.safetensors": "0" * 64,
                                                            "models/model-0008.json": "0" * 64}))
    with pytest.raises(BenchError, match=r"files: 'models/model-0008\.json' is not a file of the pool of tiny-digits "
                                         r"\(8 models\); refused"):
        install_snapshot(snapshot, spec, cache, "mptq/tiny-digits-pool")
    assert _nothing_installed(cache)


def test_a_snapshot_file_linking_outside_the_repository_is_refused(hub_cache: dict, tmp_path: Path) -> None:
    snapshot = hub_cache["snapshot"]
    outside = tmp_path / "outside.json"
    record = snapshot / "models" / "model-0002.json"
    outside.write_bytes(record.read_bytes())  # same content, same sha256: only where it lives is wrong
    record.unlink()
    record.symlink_to(outside)
    with pytest.raises(BenchError, match=r"models/model-0002\.json: leads outside the downloaded repository; refused"):
        install_snapshot(snapshot, load_task("tiny-digits"), tmp_path / "cache", "mptq/tiny-digits-pool")


def test_a_verified_snapshot_installs_whole(hub_cache: dict, tmp_path: Path) -> None:
    source = install_snapshot(hub_cache["snapshot"], load_task("tiny-digits"), tmp_path / "cache", "mptq/tiny-digits-pool")
    assert source.revision == COMMIT and PoolStore(tmp_path / "cache", load_task("tiny-digits")).is_complete_pool()


@pytest.mark.slow
def test_pool_pull_refuses_a_manifest_escaping_the_pool(hub_cache: dict, tmp_path: Path) -> None:
    """Through the real Hub client and the CLI: exit 2, one line, nothing installed anywhere."""
    snapshot = hub_cache["snapshot"]
    blob = snapshot.parent.parent / "blobs" / "evilblob"
    blob.parent.mkdir(exist_ok=True)
    blob.write_bytes(b"evil")
    _rewrite_manifest(snapshot, lambda files: files.update({"../../blobs/evilblob": sha256_file(blob)}))
    env = {k: v for k, v in hub_cache.items() if k != "snapshot"}
    cache = tmp_path / "c"
    pulled = cli("pool", "pull", "tiny-digits", "--repo", "mptq/tiny-digits-pool", "--cache-dir", str(cache), env=env)
    assert pulled.returncode == 2 and "'../../blobs/evilblob' is not a plain relative name inside the pool; refused" \
        in pulled.stderr and "Traceback" not in pulled.stderr
    assert _nothing_installed(cache) and not (cache / "blobs").exists()
