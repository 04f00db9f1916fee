from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mia_ptq_bench.cli import app
from test_pool import Logged

cli = CliRunner()


def test_schema_prints_json_schemas() -> None:
    result = cli.invoke(app, ["schema"])
    schema = json.loads(result.output)
    assert result.exit_code == 0 and schema["title"] == "Result" and "quantized" in schema["properties"]
    task = json.loads(cli.invoke(app, ["schema", "task"]).output)
    assert task["additionalProperties"] is False
    assert cli.invoke(app, ["schema", "nonsense"]).exit_code == 2


def test_tasks_lists_bundled_and_test_tasks() -> None:
    result = cli.invoke(app, ["tasks"], env={"COLUMNS": "160"})
    assert result.exit_code == 0
    assert "digits-mlp" in result.output and "cifar100-resnet18" in result.output and "tiny-digits" in result.output


def test_tasks_piped_into_80_columns_cuts_no_plan() -> None:
    result = cli.invoke(app, ["tasks"], env={"COLUMNS": "80"})  # not a terminal: a pipe or a file
    assert result.exit_code == 0, result.stderr
    row = next(line for line in result.output.splitlines() if line.startswith(" digits-mlp "))
    assert row.split()[-4:] == ["w4", "w2", "w1.58", "w1.58-last8"], row


def test_tasks_lists_every_good_task_and_names_each_bad_file(tmp_path: Path) -> None:
    # One invalid file under $MPTQ_TASKS used to stop the listing at it.
    (tmp_path / "broken.yaml").write_text("id: broken\nextends: broken.yaml\n")
    (tmp_path / "typo.yaml").write_text("id: typo\ntraining: [\n")
    result = cli.invoke(app, ["tasks"], env={"COLUMNS": "200", "MPTQ_TASKS": str(tmp_path)})
    assert result.exit_code == 1
    assert "digits-mlp" in result.output and "fashion-mnist-resnet" in result.output
    problems = [line for line in result.stderr.splitlines() if line.startswith("invalid:")]
    assert len(problems) == 2 and "broken.yaml: extends: 'broken.yaml' makes a cycle" in problems[0]
    assert "typo.yaml" in problems[1]


def test_quantizers_lists_builtins() -> None:
    result = cli.invoke(app, ["quantizers"], env={"COLUMNS": "160"})
    assert result.exit_code == 0 and "rtn" in result.output and "fp32" in result.output


def test_validate_rejects_other_files(tmp_path) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("hi")
    result = cli.invoke(app, ["validate", str(other)])
    assert result.exit_code == 1 and "not a task (.yaml) or result (.json)" in result.stderr


def test_version_and_short_help() -> None:
    from mia_ptq_bench import __version__

    assert cli.invoke(app, ["--version"]).output.strip() == f"mia-ptq-bench {__version__}"
    assert "Usage" in cli.invoke(app, ["-h"]).output and "Usage" in cli.invoke(app, ["evaluate", "-h"]).output


def test_near_misses_get_a_suggestion(tmp_path) -> None:
    result = cli.invoke(app, ["evaluate", "rnt", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown quantizer 'rnt' (did you mean 'rtn'?)" in result.stderr
    result = cli.invoke(app, ["evaluate", "rtn", "--task", "digits-mpl", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown task 'digits-mpl' (did you mean 'digits-mlp'?)" in result.stderr
    result = cli.invoke(app, ["evaluate", "zzzz", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "did you mean" not in result.stderr  # no suggestion for nothing close


@pytest.mark.parametrize("args, expected", [
    (["--device", "bogus"], ["--device 'bogus': not a torch device"]),
    (["--device", "cuda:99"], ["--device 'cuda:99': no CUDA device is usable here",
                               "--device 'cuda:99': this machine has"]),
    (["--set", "steps=[1"], ["--set 'steps=[1': the value is not valid YAML"]),
    # JSON holds no inf: the result recorded null, which its reproduction refused
    (["--set", "p=.inf"], ["rtn config (--set): p: Input should be a finite number (got inf)"]),
    (["--attack", " "], ["--attack: empty (leave the option out for the task's first attack)"]),
    (["--set", "seed=340282366920938463463374607431768211456"],
     ["adaround config (--set): seed: Input should be less than or equal to 9223372036854775807"]),
])
def test_bad_options_are_one_line_before_any_work(tmp_path, args, expected) -> None:
    method = "adaround" if "seed" in args[-1] else "rtn"  # a seed that overflowed torch's generator mid-run
    result = cli.invoke(app, ["evaluate", method, "--task", "tiny-digits", "--out", str(tmp_path / "r"), *args])
    message = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "Traceback" not in message, message
    assert any(f"error: {e}" in message for e in expected), message
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, option", [
    (["evaluate", "rtn", "--task", "tiny-digits", "--out", ""], "--out"),
    (["evaluate", "rtn", "--task", "tiny-digits", "--cache-dir", "  "], "--cache-dir"),
    (["evaluate", "rtn", "--task", "tiny-digits", "--data-root="], "--data-root"),
    (["validate", ""], "files"),
    (["cache", "list", "--cache-dir", ""], "--cache-dir"),
    (["findings", "--out", ""], "--out"),
])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch, args, option) -> None:
    monkeypatch.chdir(tmp_path)
    result = cli.invoke(app, args)
    message = " ".join(result.stderr.split())
    assert result.exit_code == 2 and f"Invalid value for '{option}': an empty path" in message, message
    assert list(tmp_path.iterdir()) == []  # nothing written where Path("") points


def test_cache_list_reads_damaged_bookkeeping_without_a_traceback(tmp_path) -> None:
    pool = tmp_path / "pools" / "tiny-digits-0123456789ab"
    (pool / "models").mkdir(parents=True)
    (pool / "pool.json").write_text("[]")
    (pool / "source.json").write_text("{oops")
    from mia_ptq_bench.cache_admin import list_cache

    result = cli.invoke(app, ["cache", "list", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert [entry.detail for entry in list_cache(tmp_path)] == ["0/0 models, pulled (source.json unreadable)"]


def test_folders_an_interrupted_pull_leaves_are_listed_as_such_and_cleared(tmp_path) -> None:
    from mia_ptq_bench.cache_admin import clear_cache, list_cache

    leftover = tmp_path / "pools" / ".replaced-k2j4"
    (leftover / "models").mkdir(parents=True)
    (leftover / "models" / "model-0000.json").write_text("{}")
    assert [(e.kind, e.task, e.detail) for e in list_cache(tmp_path)] == [
        ("pool", "", "left by an interrupted pull: safe to delete")]
    assert [e.path for e in clear_cache(tmp_path, "pool")] == [leftover] and not leftover.exists()


@contextlib.contextmanager
def another_process_running(cache_dir: Path, task: str) -> Iterator[None]:
    """A run of ``task`` in another process, holding ``cache_dir`` (``cache.in_use``) while the block runs."""
    holder = subprocess.Popen(  # it holds the cache until its stdin closes
        [sys.executable, "-c", "import sys; from mia_ptq_bench.cache import in_use\n"
         f"with in_use({str(cache_dir)!r}, [{task!r}]):\n    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.communicate("", timeout=60)


@pytest.mark.skipif(sys.platform == "win32", reason="Windows has no flock: runs and clear do not see each other")
def test_cache_clear_is_refused_while_another_process_uses_the_cache(tmp_path) -> None:
    pool = tmp_path / "pools" / "tiny-digits-0123456789ab"
    (pool / "models").mkdir(parents=True)
    with another_process_running(tmp_path, "tiny-digits"):
        refused = cli.invoke(app, ["cache", "clear", "--cache-dir", str(tmp_path)])
        message = " ".join(refused.stderr.split())
        assert refused.exit_code == 2 and "a run (evaluate, reproduce" in message and "is using this cache" in message
        assert pool.is_dir()
    cleared = cli.invoke(app, ["cache", "clear", "--cache-dir", str(tmp_path)])
    assert cleared.exit_code == 0 and "removed 1 entries" in cleared.output and not pool.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="Windows has no flock: runs and clear do not see each other")
def test_a_clear_of_another_task_goes_on_beside_a_run_and_one_of_its_own_is_refused(tmp_path) -> None:
    from mia_ptq_bench import cache

    running = tmp_path / "quantized" / "tiny-digits-0123456789ab" / "rtn" / "w4"
    other = tmp_path / "quantized" / "tiny-cnn-0123456789ab" / "rtn" / "w4"
    for folder in (running, other):
        folder.mkdir(parents=True)
    with another_process_running(tmp_path, "tiny-digits"):
        # No run of tiny-cnn has made its lock file: one that could not write the cache may be using it unmarked.
        unmarked = cli.invoke(app, ["cache", "clear", "--task", "tiny-cnn", "--cache-dir", str(tmp_path)])
        assert unmarked.exit_code == 2 and "no run of tiny-cnn has marked" in " ".join(unmarked.stderr.split())
        assert other.is_dir()
        (tmp_path / cache.task_lock_name("tiny-cnn")).touch()  # as any earlier run of tiny-cnn leaves it
        cleared = cli.invoke(app, ["cache", "clear", "--task", "tiny-cnn", "--cache-dir", str(tmp_path)])
        assert cleared.exit_code == 0, cleared.stderr
        assert not other.exists() and running.is_dir()
        for command in (["--task", "tiny-digits"], []):
            refused = cli.invoke(app, ["cache", "clear", *command, "--cache-dir", str(tmp_path)])
            message = " ".join(refused.stderr.split())
            assert refused.exit_code == 2 and running.is_dir(), refused.output
            assert ("a run of tiny-digits (evaluate" in message) if command else ("is using this cache" in message)
    cleared = cli.invoke(app, ["cache", "clear", "--task", "tiny-digits", "--cache-dir", str(tmp_path)])
    assert cleared.exit_code == 0 and not running.exists()


def test_clear_refuses_a_task_that_is_no_task_id_and_writes_nothing(tmp_path) -> None:
    # --task names a lock file beside the cache's: a path there would lock (or create) something else.
    (tmp_path / "cache" / "pools" / "tiny-digits-0123456789ab").mkdir(parents=True)  # not "tiny"'s, nor "digits"'
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for task in ("../outside", "Tiny", ".hidden", "a/b", "x" * 65):
        refused = cli.invoke(app, ["cache", "clear", "--task", task, "--cache-dir", str(tmp_path / "cache")])
        assert refused.exit_code == 2 and "not a task id" in refused.stderr, (task, refused.output)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    for task in ("nosuch", "tiny", "digits", "0123456789ab"):
        nothing = cli.invoke(app, ["cache", "clear", "--task", task, "--cache-dir", str(tmp_path / "cache")])
        assert nothing.exit_code == 0 and "removed 0 entries" in nothing.output, (task, nothing.output)  # no lock file
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_pool_belongs_to_the_task_its_folder_names(tmp_path) -> None:
    # A pulled pool.json may carry the id of the task that pushed it; runs name and lock the folder's.
    from mia_ptq_bench.cache_admin import list_cache

    pool = tmp_path / "pools" / "bar-0123456789ab"
    (pool / "models").mkdir(parents=True)
    (pool / "pool.json").write_text(json.dumps({"task_id": "foo", "spec": {"membership": {"n_models": 4}}}))
    assert [(e.task, e.detail) for e in list_cache(tmp_path)] == [("bar", "0/4 models")]


def test_a_run_waits_for_a_clear_of_its_own_task_only(tmp_path) -> None:
    from conftest import HeldClear
    from mia_ptq_bench import cache
    from mia_ptq_bench.cache_admin import clear_cache
    from mia_ptq_bench.errors import CacheError

    clear = HeldClear(tmp_path, task="tiny-digits")
    try:
        said = []
        with cache.in_use(tmp_path, ["tiny-cnn"], waiting=said.append):  # another task's run: no wait
            pass
        assert said == []
        (tmp_path / "pools").mkdir()  # something to clear: a clear of the whole cache must wait for this one
        with pytest.raises(CacheError, match="or a `cache clear --task` is using this cache"):
            clear_cache(tmp_path)
        with cache.in_use(tmp_path, ["tiny-cnn", "tiny-digits"], waiting=clear.waiting):
            pass
        assert len(clear.said) == 1 and "a `cache clear --task tiny-digits` holds this task's cached work" in clear.said[0]
    finally:
        clear.end()


@pytest.mark.skipif(sys.platform == "win32", reason="Windows has no flock: runs and clear do not see each other")
def test_evaluate_holds_the_cache_while_it_runs(tmp_path, monkeypatch) -> None:
    from mia_ptq_bench import runner
    from mia_ptq_bench.cache_admin import clear_cache
    from mia_ptq_bench.errors import CacheError
    from mia_ptq_bench.spec import load_registered_task

    seen = []

    def clear_instead(context, options, progress):
        with pytest.raises(CacheError, match="is using this cache"):
            clear_cache(options.cache_dir)
        with pytest.raises(CacheError, match="a run of tiny-digits"):  # nor a clear of the run's own task
            clear_cache(options.cache_dir, task="tiny-digits")
        seen.append(True)
        raise KeyboardInterrupt  # enough: the run stops here

    monkeypatch.setenv("MPTQ_TASKS", str(Path(__file__).parent / "tasks"))
    monkeypatch.setattr(runner, "prepare_pool", clear_instead)
    other = tmp_path / "cache" / "pools" / "tiny-digits-0123456789ab" / "models"  # something to clear
    other.mkdir(parents=True)
    options = runner.RunOptions(out_dir=tmp_path / "results", cache_dir=tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate("rtn", load_registered_task("tiny-digits"), ["w4"], ["oblivious"], options)
    assert seen == [True] and other.is_dir()
    assert [e.path for e in clear_cache(tmp_path / "cache")] == [other.parent]  # released when the run ended


def test_a_run_starting_during_a_clear_says_it_waits_then_goes_on(tmp_path, monkeypatch, held_clear) -> None:
    from mia_ptq_bench import cache, runner
    from mia_ptq_bench.spec import load_registered_task

    held = []

    class ClearEndsOnLog(Logged):
        def log(self, message: str) -> None:
            super().log(message)
            held_clear.waiting(message)  # the clear ends: the run's lock can now be granted

    def check_held(context, options, progress):
        probe = open(tmp_path / "cache" / cache.LOCK_NAME, "rb")
        with pytest.raises(BlockingIOError):  # the run holds it now: another clear would be refused
            cache.fcntl.flock(probe, cache.fcntl.LOCK_EX | cache.fcntl.LOCK_NB)
        probe.close()
        held.append(True)
        raise KeyboardInterrupt

    monkeypatch.setenv("MPTQ_TASKS", str(Path(__file__).parent / "tasks"))
    monkeypatch.setattr(runner, "prepare_pool", check_held)
    options = runner.RunOptions(out_dir=tmp_path / "results", cache_dir=tmp_path / "cache")
    log = ClearEndsOnLog()
    with pytest.raises(KeyboardInterrupt):
        runner.evaluate("rtn", load_registered_task("tiny-digits"), ["w4"], ["oblivious"], options, progress=log)
    assert held == [True]
    assert len(log.lines) == 1 and "a `cache clear` holds this cache; waiting for it to finish" in log.lines[0]
    said = []
    with cache.in_use(tmp_path / "cache", ["tiny-digits"], waiting=said.append):  # no clear running: nothing to say
        pass
    assert said == []


def test_pool_push_waiting_for_a_clear_of_its_task_says_so_on_stderr(tmp_path, monkeypatch) -> None:
    # (validate --recompute: test_recompute; pool pull: test_scale; leaderboard build --recompute shares validate's code)
    from conftest import HeldClear
    from mia_ptq_bench.pool import hub

    def offline(where, call, action="download"):
        raise hub.BenchError(f"{where}: no network in tests")

    monkeypatch.setenv("MPTQ_TASKS", str(Path(__file__).parent / "tasks"))
    HeldClear(tmp_path / "cache", task="tiny-digits").ends_when_the_cli_says_it_waits(monkeypatch)
    staged = []
    monkeypatch.setattr(hub, "export_pool", lambda store, folder: staged.append(folder))
    monkeypatch.setattr(hub, "_hub_call", offline)
    pushed = cli.invoke(app, ["pool", "push", "tiny-digits", "--repo", "mptq/x", "--cache-dir", str(tmp_path / "cache")])
    assert len(staged) == 1 and "no network in tests" in pushed.stderr, pushed.output
    assert "a `cache clear --task tiny-digits` holds this task's cached work; waiting for it to finish" \
        in " ".join(pushed.stderr.split())


def test_a_file_system_without_flock_leaves_runs_and_clear_unguarded_not_failing(tmp_path, monkeypatch) -> None:
    import errno

    from mia_ptq_bench import cache
    from mia_ptq_bench.cache_admin import clear_cache

    if cache.fcntl is None:
        pytest.skip("no flock on this platform")

    def unsupported(handle, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(cache.fcntl, "flock", unsupported)
    pool = tmp_path / "pools" / "tiny-digits-0123456789ab"
    (pool / "models").mkdir(parents=True)
    with cache.in_use(tmp_path, ["tiny-digits"]):
        assert [e.path for e in clear_cache(tmp_path)] == [pool]


def test_clear_of_a_folder_without_cached_work_writes_nothing_there(tmp_path) -> None:
    from mia_ptq_bench.cache_admin import clear_cache

    (tmp_path / "notes.txt").write_text("not a cache")
    assert clear_cache(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("level", ["pool", "quantized-pool", "quantized-plan"])
def test_cache_clear_removes_a_link_and_never_what_it_points_to(tmp_path, level: str) -> None:
    # glob followed a link in the middle of quantized/*/*/* and rmtree then deleted the target's folders.
    from mia_ptq_bench.cache_admin import clear_cache, list_cache

    cache, outside = tmp_path / "cache", tmp_path / "outside"
    (outside / "precious" / "data").mkdir(parents=True)
    (outside / "precious" / "data" / "file.txt").write_text("keep")
    where = {"pool": cache / "pools" / "tiny-digits-000000000000",
             "quantized-pool": cache / "quantized" / "tiny-digits-000000000000",
             "quantized-plan": cache / "quantized" / "tiny-digits-000000000000" / "rtn-0123456789ab" / "w4-cal01234567"}
    where[level].parent.mkdir(parents=True)
    where[level].symlink_to(outside, target_is_directory=True)
    listed = list_cache(cache)
    assert [(e.path, e.task, e.detail) for e in listed] == [
        (where[level], "tiny-digits", f"a symbolic link (to {outside}), not followed")]
    assert [e.path for e in clear_cache(cache, task="tiny-digits")] == [where[level]]
    assert not where[level].is_symlink() and (outside / "precious" / "data" / "file.txt").read_text() == "keep"


def test_cache_list_counts_models_not_the_temporary_files_a_killed_writer_left(tmp_path) -> None:
    from mia_ptq_bench.cache_admin import list_cache

    plan = tmp_path / "quantized" / "tiny-digits-000000000000" / "rtn-0123456789ab" / "w4-cal01234567"
    plan.mkdir(parents=True)
    for name in ("model-0000.npz", "model-0001.npz", ".model-0002.npz.a1b2c3d4.tmp"):
        (plan / name).write_bytes(b"x")
    (entry,) = list_cache(tmp_path)
    assert entry.detail == "rtn-0123456789ab w4-cal01234567: 2 models" and entry.files == 3


def test_the_command_reports_a_path_the_file_system_refuses_in_one_line(tmp_path: Path) -> None:
    # An over-long name raises OSError from pathlib wherever a command first touches the path, inside or
    # outside its own error handling: the command (cli.run, the script's entry point) prints one line.
    long = tmp_path / ("a" * 300)
    for args in (["validate", f"{long}.yaml"], ["evaluate", "rtn", "--task", "digits-mlp", "--out", str(long)]):
        proc = subprocess.run([sys.executable, "-m", "mia_ptq_bench", *args], capture_output=True, text=True,
                              env={**os.environ, "COLUMNS": "200"}, timeout=300)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "File name too long" in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
