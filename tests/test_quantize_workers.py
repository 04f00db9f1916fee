"""Quantization in resident worker processes: where each group goes, what a process keeps, and that the bits
are those of this process run with a worker's thread count."""

from __future__ import annotations

import pickle
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from mia_ptq_bench.context import RunContext
from mia_ptq_bench.data import load_dataset
from mia_ptq_bench.data.splits import evaluation_test_split
from mia_ptq_bench.errors import BenchError
from mia_ptq_bench.executor import ResidentProcesses
from mia_ptq_bench.pool import build_pool
from mia_ptq_bench.progress import SilentProgress
from mia_ptq_bench.quantize import QUANTIZERS
from mia_ptq_bench.quantize.outputs import OutputStore, environment_key, quantize_unit, receive_pool
from mia_ptq_bench.results.compare import same_environment
from mia_ptq_bench.results.schema import Environment
from mia_ptq_bench.runner import (RunOptions, evaluate, grid_extent, models_quantized, quantize_groups,
                                  quantize_workers)
from mia_ptq_bench.spec import PrecisionPlan, load_task


class Logged(SilentProgress):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def test_groups_are_fixed_by_the_models_even_and_as_many_as_a_multiple_of_the_workers() -> None:
    models = list(range(47))
    assert [len(g) for g in quantize_groups(models, 16, 1)] == [16, 16, 15]
    assert [len(g) for g in quantize_groups(models, 16, 2)] == [12, 12, 12, 11]
    assert [i for g in quantize_groups(models, 16, 2) for i in g] == models  # each once, in order
    assert quantize_groups([3, 9, 12], 16, 2) == [(3, 9), (12,)]
    assert quantize_groups([5], 16, 2) == [(5,)]  # never an empty group for a worker with nothing to do
    assert quantize_groups([], 16, 2) == []
    assert max(len(g) for g in quantize_groups(list(range(40)), 8, 3)) <= 8
    assert [len(g) for g in quantize_groups(list(range(33)), 16, 2)] == [9, 8, 8, 8]
    assert [len(g) for g in quantize_groups(list(range(9)), 16, 4)] == [3, 2, 2, 2]


def test_resident_processes_keep_each_slot_in_one_process_from_map_to_map() -> None:
    from worker_units import counts_its_jobs, hand

    with ResidentProcesses(2, partial(hand, "handed")) as processes:
        first = processes.map(counts_its_jobs, ["a", "b", "c"])  # slots 0, 1, 2 -> processes 0, 1, 0
        second = processes.map(counts_its_jobs, ["d", "e"], slots=[1, 2])  # processes 1, 0
    (pid_a, n_a, setup), (pid_b, n_b, _), (pid_c, n_c, _) = first
    assert pid_a == pid_c != pid_b and (n_a, n_b, n_c) == (1, 1, 2)
    assert setup == ["handed"]  # the setup ran once in each process, before its first job
    (pid_d, n_d, _), (pid_e, n_e, handed) = second
    assert (pid_d, n_d) == (pid_b, 2) and (pid_e, n_e) == (pid_a, 3) and handed == ["handed"]


def test_resident_processes_end_at_the_first_failure_and_say_so_when_used_again() -> None:
    from worker_units import dies, raises_bench_error

    processes = ResidentProcesses(2)
    assert processes.map(raises_bench_error, [3, 1, 4]) == [9, 1, 16]
    with pytest.raises(BenchError, match="two: refused input"):
        processes.map(raises_bench_error, [1, 2, 3])
    with pytest.raises(BenchError, match="already ended"):
        processes.map(raises_bench_error, [1])
    with pytest.raises(BenchError, match="job 1: a worker process died"):
        ResidentProcesses(2).map(dies, [0, 1], describe=lambda job: f"job {job}")
    with pytest.raises(BenchError, match="worker processes: 0"):
        ResidentProcesses(0)


def test_workers_start_with_the_drivers_torch_settings() -> None:
    """A spawned process starts from torch's defaults: the settings that can change bits are handed over."""
    from mia_ptq_bench.executor import ProcessExecutor, apply_torch_settings, torch_settings
    from worker_units import torch_settings_here

    before = torch_settings()
    assert before["flush_denormal"] is False and before["float32_matmul_precision"] == "highest"
    try:
        # oneDNN's own level in float32, its matmuls in bfloat16 on a CPU that has it: the public property of the
        # first writes the general level instead, so both are handed over as torch keeps them
        torch._C._set_fp32_precision_setter("mkldnn", "all", "ieee")
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_default_dtype(torch.float64)
        torch.backends.mkldnn.enabled = False
        flushes = torch.set_flush_denormal(True)  # False on a CPU without flush-to-zero: then nothing changed
        here = torch_settings()
        assert here != before and here["flush_denormal"] is flushes
        assert here["fp32_precision.mkldnn.all"] == "ieee" and here["fp32_precision.generic.all"] == "none"
        with ResidentProcesses(1) as processes:
            assert processes.map(torch_settings_here, [0]) == [here]
        assert ProcessExecutor(1).map(torch_settings_here, [0]) == [here]
        # set_float32_matmul_precision keeps one value beside the per-backend ones: a worker gets both
        apply_torch_settings(before)
        torch.set_float32_matmul_precision("high")
        here = torch_settings()
        assert here["float32_matmul_precision"] == "high" and here["fp32_precision.mkldnn.matmul"] == "tf32"
        assert ProcessExecutor(1).map(torch_settings_here, [0]) == [here]
    finally:
        apply_torch_settings(before)
    assert torch_settings() == before


def test_settings_this_torch_lacks_are_refused_not_added(monkeypatch: pytest.MonkeyPatch) -> None:
    from mia_ptq_bench import executor

    before = executor.torch_settings()
    # a flag the driver's (other) torch has and this one lacks, in the list handed over
    monkeypatch.setattr(executor, "_BACKEND_FLAGS", executor._BACKEND_FLAGS + ("cudnn.not_in_this_torch",))
    with pytest.raises(BenchError, match=r"torch .* here has no torch.backends.cudnn.not_in_this_torch"):
        executor.apply_torch_settings({**before, "cudnn.not_in_this_torch": True})
    assert not hasattr(torch.backends.cudnn, "not_in_this_torch")
    monkeypatch.setattr(executor, "_BACKEND_FLAGS", executor._BACKEND_FLAGS + ("nothing.at_all",))
    with pytest.raises(BenchError, match=r"here has no torch.backends.nothing.at_all"):
        executor.apply_torch_settings({**before, "nothing.at_all": 1})
    executor.apply_torch_settings(before)


@pytest.mark.parametrize("change, cause", [
    ({"default_dtype": torch.int64}, "TypeError: .*"),  # set_default_dtype refuses it
    # a flag this torch lacks, as a driver's other torch version might hand over
    ({"cudnn.not_in_this_torch": True}, "BenchError: torch .* here does not hold the settings handed over: "
                                        r"cudnn.not_in_this_torch 'absent' \(handed True\)"),
])
def test_a_worker_that_cannot_take_the_drivers_settings_says_so(change: dict, cause: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from mia_ptq_bench import executor
    from worker_units import torch_settings_here

    settings = {**executor.torch_settings(), **change}
    monkeypatch.setattr(executor, "torch_settings", lambda: settings)
    with pytest.raises(BenchError, match="a worker process could not start: " + cause):
        ResidentProcesses(1).map(torch_settings_here, [0])


def test_a_worker_whose_setup_fails_says_why_and_one_that_died_between_maps_says_so() -> None:
    import os
    import signal

    from worker_units import counts_its_jobs, hand

    with pytest.raises(BenchError, match=r"a worker process could not start: TypeError: .*hand\(\)"):
        ResidentProcesses(1, partial(hand, "one", "too many")).map(counts_its_jobs, ["a"])
    processes = ResidentProcesses(2)
    ((pid, _, _),) = processes.map(counts_its_jobs, ["a"])
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(BenchError, match="job b: a worker process died"):
        processes.map(counts_its_jobs, ["b"], describe=lambda job: f"job {job}")


def test_copies_of_one_context_in_a_process_share_what_they_loaded(tiny_task) -> None:
    context = RunContext(tiny_task, Path("cache"))
    first, second = (pickle.loads(pickle.dumps(context)) for _ in range(2))
    kept = first.loaded("thing", object)
    assert second.loaded("thing", object) is kept  # as a later unit in the same worker finds it
    assert context.loaded("thing", object) is not kept  # the driver's own context is not a received copy
    other = pickle.loads(pickle.dumps(RunContext(tiny_task, Path("cache"))))
    assert other.loaded("thing", object) is not kept  # another run's context starts empty...
    assert pickle.loads(pickle.dumps(context)).loaded("thing", object) is not kept  # ...and lets the last one go


def test_a_process_goes_on_with_the_first_quantizer_it_received_and_its_memo(tmp_path: Path) -> None:
    """Each unit arrives with a fresh copy of the driver's quantizer; the copy the process kept from an earlier
    plan holds that plan's units, which w1.58-last8 replays."""
    spec = load_task("tiny-cnn")
    data = load_dataset(spec.dataset)
    pool = build_pool(spec, data, tmp_path)
    context = RunContext(spec, tmp_path)
    receive_pool(pickle.loads(pickle.dumps(context)), pickle.dumps((pool, evaluation_test_split(spec.calibration,
                                                                                                data))))
    sent = QUANTIZERS.get("gptq")()
    received = [pickle.loads(pickle.dumps(sent)) for _ in range(2)]
    made_in = environment_key("cpu")
    quantize_unit(pickle.loads(pickle.dumps(context)), received[0], "w1.58", made_in, (0, 1))
    replayed = []
    original = type(received[0]._memo).replay

    def counted(memo, key, steps):
        replay = original(memo, key, steps)
        replayed.append(replay.replayed)
        return replay

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(received[0]._memo), "replay", counted)
        quantize_unit(pickle.loads(pickle.dumps(context)), received[1], "w1.58-last8", made_in, (0, 1))
    assert not received[1]._memo.runs  # never used: the process went on with the first copy
    assert replayed and replayed[-1] > 0  # and that copy replayed the units w1.58 quantized
    for plan in ("w1.58", "w1.58-last8"):
        store = OutputStore(tmp_path, pool, sent, PrecisionPlan.parse(plan), made_in)
        assert all(store.load(i) is not None for i in (0, 1))


def test_models_quantized_in_two_processes_are_those_quantized_here_with_one_thread(tmp_path: Path) -> None:
    """BatchNorm folded, GPTQ, two plans of which the second replays the first: the result arrays of a run in
    two worker processes of one thread equal those of a run here with one thread and the same groups, its
    environment names the workers, and a run resumed after an output was lost redoes that model's whole group
    to the same bits."""
    spec = load_task("tiny-cnn")
    plans, threats = ["w1.58", "w1.58-last8"], ["oblivious", "adaptive"]
    models = len(set(spec.quantized_shadow_models) | set(range(spec.targets.count)))
    group = -(-models // 2)  # two groups either way: the layouts agree
    threads = torch.get_num_threads()

    def run(name: str, workers: int, asked: list[str] = threats, log: Logged | None = None):
        options = RunOptions(out_dir=tmp_path / name, cache_dir=tmp_path / "cache", outputs_dir=tmp_path / f"{name}-q",
                             device="cpu", workers=workers, quantize_group=group)
        return evaluate("gptq", spec, plans, asked, options, log)

    log = Logged()
    try:
        torch.set_num_threads(2)
        targets_only = run("targets", 2, ["oblivious"])  # its targets quantized in the groups of a full run
        apart = run("apart", 2, log=log)
        store = OutputStore(tmp_path / "apart-q", apart.pool, QUANTIZERS.get("gptq")(), PrecisionPlan.parse("w1.58"),
                            environment_key("cpu", 2))
        written = {i: store.path(i).stat().st_mtime_ns for i in range(models)}
        lost = store.path(1)
        lost.unlink()
        resumed = run("apart", 2)
        torch.set_num_threads(1)
        here = run("here", 1)
    finally:
        torch.set_num_threads(threads)
    assert "quantizing in 2 processes of 1 thread(s) each" in log.lines
    assert lost.exists()
    again = {i: store.path(i).stat().st_mtime_ns for i in range(models)}
    first_group = set(range(group))  # model 1's, quantized whole again; the other group left as it was
    assert all((again[i] != written.get(i)) == (i in first_group) for i in range(models)), (written, again)
    for a, b in zip(targets_only.results, [r for r in apart.results if r.threat_model == "oblivious"], strict=True):
        ta, tb = (np.load(tmp_path / name / spec.id / "gptq" / r.arrays.file)["target_scores"]
                  for name, r in (("targets", a), ("apart", b)))
        np.testing.assert_array_equal(ta, tb)
    for theirs, ours, again in zip(apart.results, here.results, resumed.results, strict=True):
        assert theirs.environment.quantize_workers == 2 and ours.environment.quantize_workers == 1
        assert theirs.environment.torch_threads == 2 and ours.environment.torch_threads == 1
        a = np.load(tmp_path / "apart" / spec.id / "gptq" / theirs.arrays.file)
        b = np.load(tmp_path / "here" / spec.id / "gptq" / ours.arrays.file)
        assert a.files == b.files
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert again.arrays.sha256 == theirs.arrays.sha256


def test_workers_are_chosen_for_a_long_method_on_a_large_grid_on_the_local_executor(
        tiny_task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mia_ptq_bench.pool import train

    data = load_dataset(tiny_task.dataset)
    pool = build_pool(tiny_task, data, tmp_path)
    brecq, gptq = QUANTIZERS.get("brecq")(), QUANTIZERS.get("gptq")()
    assert brecq.runs_long and not gptq.runs_long
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert quantize_workers(tiny_task, pool, brecq, RunOptions(device="cpu")) == 1  # seconds of work: no workers
        monkeypatch.setattr(train, "WORKER_WORK", 0.0)  # as if the grid were large
        assert quantize_workers(tiny_task, pool, brecq, RunOptions(device="cpu")) == 2
        assert quantize_workers(tiny_task, pool, gptq, RunOptions(device="cpu")) == 1  # its time goes to scoring
        assert quantize_workers(tiny_task, pool, gptq, RunOptions(device="cpu", workers=3)) == 3
        remote = RunOptions(device="cpu")
        remote.executor = object()  # Ray runs the same layout: the choice does not look at the executor
        assert quantize_workers(tiny_task, pool, brecq, remote) == 2
        with pytest.raises(BenchError, match="worker processes: 0"):
            quantize_workers(tiny_task, pool, gptq, RunOptions(device="cpu", workers=0))
    finally:
        torch.set_num_threads(threads)


def test_the_budget_counts_the_copies_of_exactly_the_workers_the_runner_starts(
        tiny_task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both judge the task's whole grid by ``budget.scoring_work`` on the same count of forward FLOP: with the
    threshold at that work or just above it, the budget counts copies exactly when ``quantize_workers``
    starts workers, whichever plans the run asks for."""
    from mia_ptq_bench.budget import check_budget, measure_model, scoring_work
    from mia_ptq_bench.pool import train

    data = load_dataset(tiny_task.dataset)
    cache = tmp_path / "cache"
    pool = build_pool(tiny_task, data, cache)  # cached: no workers for training
    brecq = QUANTIZERS.get("brecq")()
    grid = grid_extent(tiny_task, brecq)
    assert grid[0] == len(tiny_task.plans) == 2 and grid[1] >= tiny_task.targets.count
    forward = measure_model(tiny_task, tuple(data.input_shape), data.num_classes).forward_flops
    work = scoring_work(forward, len(data.pool), len(tiny_task.queries), grid)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for threshold, workers in ((work, 2), (work * 1.001, 1)):
            monkeypatch.setattr(train, "WORKER_WORK", threshold)
            assert quantize_workers(tiny_task, pool, brecq, RunOptions(device="cpu")) == workers
            for plans in (None, tiny_task.plans[:1]):
                budget = check_budget(tiny_task, "cpu", cache, plans=plans, quantize_grid=grid)
                copies = [name for name in budget.memory_parts if name.startswith("copies")]
                assert copies == (["copies for 2 worker processes"] if workers == 2 else [])
    finally:
        torch.set_num_threads(threads)


def test_evaluate_hands_the_budget_the_grid_its_workers_are_chosen_by(
        tiny_task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mia_ptq_bench import runner

    class Checked(Exception):
        pass

    handed: dict = {}

    def check_budget(*args, **kwargs) -> None:
        handed.update(kwargs)
        raise Checked  # the rest of the run is not this test's

    monkeypatch.setattr(runner, "check_budget", check_budget)
    brecq = QUANTIZERS.get("brecq")()

    class FullPrecisionToo(type(brecq)):  # a long method that also serves fp32: a run of fp32 alone quantizes nothing
        name = "full-precision-too"

        def unsupported(self, plan: PrecisionPlan) -> str | None:
            return None if plan.is_full_precision else super().unsupported(plan)

    runs = (("brecq", ["w4"], grid_extent(tiny_task, brecq)), ("gptq", None, None), (FullPrecisionToo(), ["fp32"], None))
    for quantizer, plans, grid in runs:
        with pytest.raises(Checked):
            evaluate(quantizer, tiny_task, plans=plans,
                     options=RunOptions(out_dir=tmp_path / "out", cache_dir=tmp_path / "c"))
        assert handed["quantize_grid"] == grid and handed["workers"] is None
    assert grid_extent(tiny_task, brecq) is not None and grid_extent(tiny_task, FullPrecisionToo()) is not None


def test_the_models_a_plan_quantizes_are_the_targets_and_the_shadows_its_attacks_quantize(tiny_task) -> None:
    targets, shadows = set(range(tiny_task.targets.count)), set(tiny_task.quantized_shadow_models)
    assert models_quantized(tiny_task, {"full-precision"}) == len(targets)
    assert models_quantized(tiny_task, {"full-precision", "same-quantizer"}) == len(targets | shadows)
    assert models_quantized(tiny_task, {"same-quantizer", "rtn"}) == len(targets | shadows) + len(shadows)


def test_a_result_from_before_workers_were_recorded_was_quantized_in_one_process(tiny_task) -> None:
    from mia_ptq_bench.environment import environment

    recorded = environment("cpu")
    old = Environment(**{k: v for k, v in recorded.items() if k != "quantize_workers"})
    assert old.quantize_workers == 1 and same_environment(old, Environment(**recorded))
    assert not same_environment(old, Environment(**environment("cpu", 2)))
    assert environment_key("cpu", 2) != environment_key("cpu")


def test_a_result_quantized_in_two_processes_is_recomputed_in_its_environment_to_every_number(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """validate --recompute scores the quantized models with a worker's threads and records the workers, so the
    rerun is in the result's environment and held to identity: every number equal (not a tolerance)."""
    from conftest import TASKS
    from mia_ptq_bench.recompute import recompute_files
    from mia_ptq_bench.results.compare import IDENTICAL, regime

    monkeypatch.setenv("MPTQ_TASKS", str(TASKS))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        outcome = evaluate("rtn", load_task("tiny-digits"), options=RunOptions(
            out_dir=tmp_path / "results", cache_dir=tmp_path / "cache", device="cpu", workers=2))
        checked = recompute_files(outcome.paths, tmp_path / "cache")
    finally:
        torch.set_num_threads(threads)
    for result, check in zip(outcome.results, checked, strict=True):
        assert check.status == "recomputed", check.reason
        assert check.rerun.environment.quantize_workers == 2
        assert regime(result, check.rerun) == IDENTICAL
        assert all(c.ok for c in check.comparisons)
