"""Sharing and scaling: pools through the real Hugging Face Hub client, Ray, and surviving SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import TASKS, needed
from mia_ptq_bench.data import load_dataset
from mia_ptq_bench.pool import PoolStore, build_pool
from mia_ptq_bench.atomic import sha256_file
from mia_ptq_bench.errors import BenchError, CacheError
from mia_ptq_bench.pool.hub import MANIFEST, export_pool, file_limit, install_snapshot, pull_pool
from mia_ptq_bench.results.io import load_result
from mia_ptq_bench.runner import RunOptions, evaluate
from mia_ptq_bench.spec import load_task
from mia_ptq_bench.spec.schema import MAX_EXAMPLES

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


@pytest.mark.slow
def test_pool_pull_with_a_data_root_refuses_a_pool_of_other_data(tmp_path: Path) -> None:
    # A consistent snapshot (its manifest matches every file) whose header names other data: only
    # comparing that hash with the local data's catches it. With --data-root, pull does so itself;
    # without, it installs the pool and says that a run compares the hash (before it uses the pool).
    spec = load_task("tiny-digits")
    build_pool(spec, load_dataset(spec.dataset), tmp_path / "origin")
    store = PoolStore(tmp_path / "origin", spec)
    header = json.loads((store.root / "pool.json").read_text())
    (store.root / "pool.json").write_text(json.dumps({**header, "data_sha256": "0" * 64}))
    repo = tmp_path / "hf" / "hub" / "models--mptq--tiny-digits-pool"
    export_pool(store, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "MPTQ_TASKS": str(TASKS)}
    pull = ("pool", "pull", "tiny-digits", "--repo", "mptq/tiny-digits-pool", "--cache-dir")
    checked = cli(*pull, str(tmp_path / "c"), "--data-root", str(tmp_path), env=env)
    assert checked.returncode == 2, checked.stdout
    assert "pool.json: data_sha256: this pool was trained on other data (000000000000…" in checked.stderr
    assert not (tmp_path / "c" / "pools").exists() or not any((tmp_path / "c" / "pools").iterdir())
    unchecked = cli(*pull, str(tmp_path / "u"), env=env)
    assert unchecked.returncode == 0, unchecked.stderr
    assert "data hash was not compared with local data (no --data-root)" in " ".join(unchecked.stdout.split())
    with pytest.raises(CacheError, match="pool.json: data_sha256: this pool was trained on other data"):
        build_pool(spec, load_dataset(spec.dataset), tmp_path / "u")


@pytest.mark.slow
def test_pool_push_failures_are_one_line(hub_cache: dict, tmp_path: Path) -> None:
    # No network here (and offline mode): the Hub client's errors, and its refusal of a malformed repo id,
    # used to be tracebacks.
    env = {k: v for k, v in hub_cache.items() if k != "snapshot"}
    for repo in ("mptq/tiny-digits-pool", "../../x"):
        pushed = cli("pool", "push", "tiny-digits", "--repo", repo, "--cache-dir", str(tmp_path / "origin"), env=env)
        assert pushed.returncode == 2, pushed.stderr
        assert f"error: hub {repo}: cannot upload the pool (" in pushed.stderr and "Traceback" not in pushed.stderr
        assert len(pushed.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_task_naming_the_hub_says_when_it_uses_a_pool_trained_here(tmp_path: Path) -> None:
    spec = load_task("tiny-digits")
    build_pool(spec, load_dataset(spec.dataset), tmp_path / "c")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = yaml.safe_load((TASKS / "tiny-digits.yaml").read_text())
    (tasks / "tiny-digits.yaml").write_text(yaml.safe_dump({**data, "hub": {"repo": "mptq/tiny-digits-pool",
                                                                            "revision": COMMIT}}))
    run = cli("evaluate", "rtn", "--task", "tiny-digits", "--plans", "w4", "--threat-models", "oblivious",
              "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "r"),
              env={"MPTQ_TASKS": str(tasks), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert run.returncode == 0, run.stderr
    assert "the task names the Hub pool mptq/tiny-digits-pool, but a complete pool of the task trained here" in \
        " ".join(run.stdout.split())
    assert load_result(tmp_path / "r" / "tiny-digits" / "rtn" / "w4--oblivious.json").pool_source is None


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
    data = load_dataset(spec.dataset)
    threads = torch.get_num_threads()
    try:
        executor = RayExecutor(num_cpus=2)
        distributed = evaluate("rtn", spec, options=RunOptions(out_dir=tmp_path / "ray", cache_dir=tmp_path / "cache-ray",
                                                               executor=executor))
        # A pool built in two workers' layout (groups of G/2, half the threads each) is the same under Ray
        torch.set_num_threads(2)
        in_ray = build_pool(spec, data, tmp_path / "pool-ray", trainer="stacked", stack=2, workers=2, executor=executor)
        in_processes = build_pool(spec, data, tmp_path / "pool-processes", trainer="stacked", stack=2, workers=2)
        # Quantized in two workers' layout, on the pools of the first two runs (equal, asserted below): Ray runs
        # the groups, with the threads, that resident worker processes run
        quantized = {name: evaluate("rtn", spec, options=RunOptions(out_dir=tmp_path / f"{name}-w2", workers=2,
                                                                    cache_dir=tmp_path / f"cache-{name}", **extra))
                     for name, extra in (("local", {}), ("ray", {"executor": executor}))}
    finally:
        torch.set_num_threads(threads)
        ray.shutdown()
    for a, b in zip(local.paths, distributed.paths, strict=True):
        assert numbers(a) == numbers(b)
    assert np.array_equal(local.pool.scores, distributed.pool.scores)
    assert np.array_equal(in_ray.scores, in_processes.scores)
    for a, b in zip(quantized["local"].paths, quantized["ray"].paths, strict=True):
        assert numbers(a) == numbers(b)
        assert json.loads(Path(a).read_text())["environment"]["quantize_workers"] == 2


@pytest.mark.slow
def test_ray_failures_are_reported_not_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    ray = needed("ray", "Ray not installed: pip install -e '.[ray]'")
    from mia_ptq_bench.errors import BenchError
    from mia_ptq_bench.executor import RayExecutor

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray", dir="/tmp"))

    def square(x: int) -> int:  # defined here so that Ray ships it by value to its workers
        return x * x

    attempts = Path(tempfile.mkdtemp(prefix="attempts", dir="/tmp"))

    def fails_on_two(x: int) -> int:
        with open(attempts / f"job-{x}", "a") as log:
            log.write("tried\n")
        if x == 2:
            raise ValueError("two is bad")
        if x == 3:
            raise BenchError("three: refused input")  # would be refused again: not worth a retry
        return x

    def settings_here(_: int) -> dict:
        from mia_ptq_bench.executor import torch_settings

        return torch_settings()

    from mia_ptq_bench import executor as executors

    before = executors.torch_settings()
    try:
        executor = RayExecutor(num_cpus=2, max_retries=1)
        assert executor.map(square, [1, 2, 3]) == [1, 4, 9]
        # Every task runs under the driver's torch settings, not the worker's own (torch's defaults)
        torch.set_default_dtype(torch.float64)
        torch.backends.mkldnn.enabled = False
        here = executors.torch_settings()
        assert here != before and executor.map(settings_here, [1, 2]) == [here, here]
        executors.apply_torch_settings(before)
        assert executor.map(settings_here, [1]) == [before]
        # Settings a worker cannot take (a value it refuses; a flag its torch lacks, as another version's might) are
        # refused once, not retried
        for handed, cause in (({**before, "default_dtype": torch.int64}, "TypeError: .*"),
                              ({**before, "mkldnn.matmul.not_in_this_torch": "ieee"},
                               "BenchError: torch .* here does not hold the settings handed over: "
                               "mkldnn.matmul.not_in_this_torch 'absent' \\(handed 'ieee'\\)")):
            with monkeypatch.context() as patched:
                patched.setattr(executors, "torch_settings", lambda handed=handed: handed)
                with pytest.raises(BenchError, match=r"1 of 1 Ray tasks failed .*: job 1: BenchError: the Ray worker "
                                                     r"could not take the driver's torch settings: " + cause
                                                     + r" \(not retried\)"):
                    executor.map(fails_on_two, [1], describe=lambda j: f"job {j}")
        assert not (attempts / "job-1").exists()
        with pytest.raises(BenchError, match=r"2 of 3 Ray tasks failed after 1 retries: job 2: ValueError: two is bad; "
                                             r"job 3: BenchError: three: refused input \(not retried\)"):
            executor.map(fails_on_two, [1, 2, 3], describe=lambda j: f"job {j}")
        tries = {x: (attempts / f"job-{x}").read_text().count("tried") for x in (1, 2, 3)}
        assert tries == {1: 1, 2: 2, 3: 1}
    finally:
        executors.apply_torch_settings(before)
        ray.shutdown()
        shutil.rmtree(attempts, ignore_errors=True)


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


def test_an_empty_keep_npy_that_the_manifest_vouches_for_is_refused_in_one_line(hub_cache: dict,
                                                                               tmp_path: Path) -> None:
    snapshot = hub_cache["snapshot"]
    (snapshot / "keep.npy").unlink()
    (snapshot / "keep.npy").write_bytes(b"")  # numpy raises EOFError on it, which the check once let through
    _rewrite_manifest(snapshot, lambda files: files.update({"keep.npy": hashlib.sha256(b"").hexdigest()}))
    with pytest.raises(BenchError, match=r"keep\.npy: unreadable \(No data left in file\); refused$"):
        install_snapshot(snapshot, load_task("tiny-digits"), tmp_path / "cache", "mptq/tiny-digits-pool")
    assert _nothing_installed(tmp_path / "cache")


def test_a_snapshot_file_linking_outside_the_repository_is_refused(hub_cache: dict, tmp_path: Path) -> None:
    snapshot = hub_cache["snapshot"]
    outside = tmp_path / "outside.json"
    record = snapshot / "models" / "model-0002.json"
    outside.write_bytes(record.read_bytes())  # same content, same sha256: only where it lives is wrong
    record.unlink()
    record.symlink_to(outside)
    with pytest.raises(BenchError, match=r"models/model-0002\.json: leads outside the downloaded repository; refused"):
        install_snapshot(snapshot, load_task("tiny-digits"), tmp_path / "cache", "mptq/tiny-digits-pool")


def test_a_verified_snapshot_installs_whole(hub_cache: dict, tmp_path: Path, held_clear) -> None:
    # A clear holds the cache as the install begins: it says so once, and installs when the clear ends.
    source = install_snapshot(hub_cache["snapshot"], load_task("tiny-digits"), tmp_path / "cache", "mptq/tiny-digits-pool",
                              waiting=held_clear.waiting)
    assert source.revision == COMMIT and PoolStore(tmp_path / "cache", load_task("tiny-digits")).is_complete_pool()
    assert len(held_clear.said) == 1 and "a `cache clear` holds this cache; waiting" in held_clear.said[0]


def test_pool_pull_waiting_for_a_clear_of_its_task_says_so(hub_cache: dict, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import HeldClear
    from typer.testing import CliRunner

    from mia_ptq_bench.cli import app

    _fake_hub(monkeypatch, hub_cache["snapshot"])
    monkeypatch.setenv("MPTQ_TASKS", str(TASKS))
    HeldClear(tmp_path / "cache", task="tiny-digits").ends_when_the_cli_says_it_waits(monkeypatch)
    pulled = CliRunner().invoke(app, ["pool", "pull", "tiny-digits", "--repo", "mptq/tiny-digits-pool",
                                      "--cache-dir", str(tmp_path / "cache")])
    assert pulled.exit_code == 0, pulled.output
    assert "a `cache clear --task tiny-digits` holds this task's cached work; waiting for it to finish" \
        in " ".join(pulled.stderr.split())
    assert PoolStore(tmp_path / "cache", load_task("tiny-digits")).is_complete_pool()


def _rewrite_file(snapshot: Path, name: str, write) -> None:
    """Replace a snapshot file and make the manifest agree: the file then matches its own manifest."""
    path = snapshot / name
    path.unlink()
    write(path)
    _rewrite_manifest(snapshot, lambda files: files.update({name: sha256_file(path)}))


@pytest.mark.parametrize("name", ["scores/model-0005.npy", "keep.npy", "models/model-0001.json"])
def test_a_snapshot_file_over_its_size_limit_is_refused_before_it_is_read(hub_cache: dict, tmp_path: Path,
                                                                          name: str) -> None:
    spec = load_task("tiny-digits")
    limit = file_limit(name, spec)
    # the task's own sizes bound its arrays: N examples x 2 queries x 8 bytes of scores, 8 models x N masks
    examples = spec.dataset.pool_size or MAX_EXAMPLES
    assert limit == {"scores/model-0005.npy": 4096 + examples * 16, "keep.npy": 4096 + examples * 8,
                     "models/model-0001.json": 64 * 1024}[name]
    os.truncate(hub_cache["snapshot"] / name, limit + 1)  # sparse: no disk used, and no sha256 of it is ever taken
    with pytest.raises(BenchError) as info:
        install_snapshot(hub_cache["snapshot"], spec, tmp_path / "cache", "mptq/tiny-digits-pool")
    assert str(info.value) == (f"hub mptq/tiny-digits-pool@{COMMIT[:12]}: {name}: {limit + 1:,} bytes, more than it "
                               f"may hold in this task's pool ({limit:,} bytes); refused")
    assert _nothing_installed(tmp_path / "cache")


@pytest.mark.parametrize("change, message", [
    (lambda h: h.pop("data_sha256"), "pool.json: data_sha256: missing or not a sha256"),
    (lambda h: h.update(pool_hash="0" * 64), "pool.json: pool_hash: not the pool"),
])
def test_a_pulled_header_must_name_the_pool_and_its_data(hub_cache: dict, tmp_path: Path, change, message: str) -> None:
    """A header without data_sha256 was completed with the local data's hash: a pool trained on anything passed."""
    def write(path: Path) -> None:
        header = dict(original)
        change(header)
        path.write_text(json.dumps(header))
    original = json.loads((hub_cache["snapshot"] / "pool.json").read_text())
    _rewrite_file(hub_cache["snapshot"], "pool.json", write)
    with pytest.raises(BenchError, match=re.escape(message)):
        install_snapshot(hub_cache["snapshot"], load_task("tiny-digits"), tmp_path / "cache", "mptq/tiny-digits-pool")
    assert _nothing_installed(tmp_path / "cache")


def test_a_pulled_pool_of_other_data_leaves_the_local_pool_alone(hub_cache: dict, tmp_path: Path) -> None:
    spec, cache = load_task("tiny-digits"), tmp_path / "cache"
    local = PoolStore(cache, spec)
    local.root.mkdir(parents=True)
    (local.root / "partly-trained").write_text("hours of work")
    with pytest.raises(BenchError, match=r"pool\.json: data_sha256: this pool was trained on other data"):
        install_snapshot(hub_cache["snapshot"], spec, cache, "mptq/tiny-digits-pool", data_sha256="f" * 64)
    assert (local.root / "partly-trained").read_text() == "hours of work"
    digest = load_dataset(spec.dataset).digest()  # the data it was trained on: installed over the local folder
    install_snapshot(hub_cache["snapshot"], spec, cache, "mptq/tiny-digits-pool", data_sha256=digest)
    assert local.is_complete_pool() and not (local.root / "partly-trained").exists()
    assert [p.name for p in local.root.parent.iterdir()] == [local.root.name]  # nothing set aside is left


@pytest.mark.parametrize("other", ["reversed", "three-examples"])
def test_other_masks_in_a_pulled_pool_are_refused(hub_cache: dict, tmp_path: Path, other: str) -> None:
    keep = np.load(hub_cache["snapshot"] / "keep.npy")
    # three columns: masks too small for every model to have a member, still refused as the file's fault
    changed = keep[::-1] if other == "reversed" else keep[:, :3]
    _rewrite_file(hub_cache["snapshot"], "keep.npy", lambda path: np.save(path, changed))
    with pytest.raises(BenchError, match=r"keep\.npy: not the task's membership masks \(bool \(8, \d+\)\); refused"):
        install_snapshot(hub_cache["snapshot"], load_task("tiny-digits"), tmp_path / "cache", "mptq/tiny-digits-pool")


def test_a_failed_install_keeps_the_pool_it_would_replace(hub_cache: dict, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    spec, cache = load_task("tiny-digits"), tmp_path / "cache"
    local = PoolStore(cache, spec)
    local.root.mkdir(parents=True)
    (local.root / "partly-trained").write_text("hours of work")
    rename = Path.rename

    def failing(self: Path, target):
        if self.name.startswith(".pull-"):  # the new pool's move into place
            raise OSError(28, "No space left on device")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(BenchError, match="cannot install the pool: No space left on device"):
        install_snapshot(hub_cache["snapshot"], spec, cache, "mptq/tiny-digits-pool")
    assert (local.root / "partly-trained").read_text() == "hours of work"
    assert [p.name for p in local.root.parent.iterdir()] == [local.root.name]


def _fake_hub(monkeypatch: pytest.MonkeyPatch, snapshot: Path, sizes: dict | None = None,
              error: Exception | None = None) -> list:
    """The Hub client online, without a network: the repository listing gives ``sizes`` (100 bytes by default) at
    COMMIT, downloads return ``snapshot``; ``error`` is what every call raises instead."""
    import huggingface_hub
    import huggingface_hub.constants

    calls = []

    def model_info(self, repo_id, **kwargs):
        calls.append(("model_info", kwargs))
        if error is not None:
            raise error
        names = json.loads((snapshot / MANIFEST).read_text())["files"]
        return SimpleNamespace(sha=COMMIT, siblings=[SimpleNamespace(rfilename=n, size=(sizes or {}).get(n, 100))
                                                     for n in [*names, MANIFEST, "README.md", "junk.bin"]])

    def snapshot_download(repo_id, **kwargs):
        calls.append(("snapshot_download", kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_pull_fetches_only_the_pool_files_at_the_commit_whose_sizes_it_checked(
        hub_cache: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_task("tiny-digits")
    calls = _fake_hub(monkeypatch, hub_cache["snapshot"], {"models/model-0002.safetensors": (1 << 30) + 1})
    with pytest.raises(BenchError) as info:
        pull_pool(spec, tmp_path / "cache", "mptq/tiny-digits-pool")
    assert str(info.value) == ("hub mptq/tiny-digits-pool@main: models/model-0002.safetensors: 1,073,741,825 bytes, "
                               "more than it may hold in this task's pool (1,073,741,824 bytes); not downloaded")
    assert [c[0] for c in calls] == ["model_info"]  # nothing was downloaded
    calls = _fake_hub(monkeypatch, hub_cache["snapshot"], {"junk.bin": 1 << 40})  # not a pool file: never fetched
    source = pull_pool(spec, tmp_path / "cache", "mptq/tiny-digits-pool")
    assert source.revision == COMMIT and PoolStore(tmp_path / "cache", spec).is_complete_pool()
    wanted = sorted([*json.loads((hub_cache["snapshot"] / MANIFEST).read_text())["files"], MANIFEST])
    (_, listing), (_, download) = calls
    assert listing == {"revision": None, "files_metadata": True}
    assert sorted(download["allow_patterns"]) == wanted and download["revision"] == COMMIT
    assert not download["local_files_only"]


def test_a_transport_error_of_the_hub_client_is_one_clear_error(hub_cache: dict, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    class ProxyError(Exception):
        """As the Hub client's HTTP library raises them (httpx2.ProxyError): neither an OSError nor a ValueError."""

    calls = _fake_hub(monkeypatch, hub_cache["snapshot"], error=ProxyError("proxy refused the tunnel"))
    import huggingface_hub

    def nothing_cached(repo_id, **kwargs):
        calls.append(("snapshot_download", kwargs))
        raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", nothing_cached)
    with pytest.raises(BenchError) as info:
        pull_pool(load_task("tiny-digits"), tmp_path / "cache", "mptq/tiny-digits-pool")
    assert str(info.value) == ("hub mptq/tiny-digits-pool@main: cannot download the pool (ProxyError: proxy refused "
                               "the tunnel)")
    # without a listing the pool could only come from the Hub cache (checked on disk), never be fetched unchecked
    assert [c[0] for c in calls] == ["model_info", "snapshot_download"] and calls[1][1]["local_files_only"]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(hub_cache["snapshot"]))
    source = pull_pool(load_task("tiny-digits"), tmp_path / "cache", "mptq/tiny-digits-pool")  # what the cache holds
    assert source.revision == COMMIT and PoolStore(tmp_path / "cache", load_task("tiny-digits")).is_complete_pool()


def test_pulled_files_that_match_their_manifest_but_not_the_task_are_clear_errors(hub_cache: dict,
                                                                                  tmp_path: Path) -> None:
    """Hashes only say the files agree with their own records; what they hold is checked when read."""
    spec, cache = load_task("tiny-digits"), tmp_path / "cache"
    install_snapshot(hub_cache["snapshot"], spec, cache, "mptq/tiny-digits-pool")
    store = PoolStore(cache, spec)

    def rewrite(index: int, path: Path, field: str, write) -> None:
        path.unlink()
        write(path)
        record = json.loads(store.record_path(index).read_text())
        record[field] = sha256_file(path)
        store.record_path(index).write_text(json.dumps(record))

    rewrite(3, store.scores_path(3), "scores_sha256", lambda path: np.save(path, np.zeros(3)))
    with pytest.raises(CacheError, match=r"model-0003\.npy: float64 of shape \(3,\), not float64 of shape "
                                         r"\(\d+, 2\) \(examples, queries\); delete .*model-0003\.json"):
        build_pool(spec, load_dataset(spec.dataset), cache)
    shape = np.load(store.scores_path(4)).shape
    rewrite(3, store.scores_path(3), "scores_sha256", lambda path: np.save(path, np.full(shape, np.nan)))
    with pytest.raises(CacheError, match=rf"model-0003\.npy: {shape[0] * shape[1]} scores are not finite"):
        build_pool(spec, load_dataset(spec.dataset), cache)
    rewrite(3, store.scores_path(3), "scores_sha256", lambda path: np.save(path, np.zeros(shape)))
    state = load_file(str(store.weights_path(4)))
    name = next(iter(state))
    rewrite(4, store.weights_path(4), "weights_sha256",
            lambda path: save_file({**state, name: torch.zeros(3)}, str(path)))
    pool = build_pool(spec, load_dataset(spec.dataset), cache)
    with pytest.raises(CacheError, match=rf"model-0004\.safetensors: the weights do not fit the task's mlp .*{name}"):
        pool.load_model(4)
    rewrite(4, store.weights_path(4), "weights_sha256", lambda path: path.write_bytes(b"not safetensors"))
    with pytest.raises(CacheError, match=r"model-0004\.safetensors: unreadable weights"):
        pool.load_model(4)
    record = json.loads(store.record_path(5).read_text())
    store.record_path(5).write_text(json.dumps({**record, "index": 6}))
    with pytest.raises(CacheError, match=r"model-0005\.json: index: the record is model 6's, not model 5's"):
        store.record(5)


def test_an_incomplete_pool_is_not_exported_as_corrupted(hub_cache: dict, tmp_path: Path) -> None:
    spec = load_task("tiny-digits")
    install_snapshot(hub_cache["snapshot"], spec, tmp_path / "cache", "mptq/tiny-digits-pool")
    store = PoolStore(tmp_path / "cache", spec)
    store.record_path(3).unlink()
    with pytest.raises(BenchError, match=r"the pool is incomplete \(models \[3\] missing\)"):
        export_pool(store, tmp_path / "out")


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
