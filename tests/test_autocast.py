"""Pool training under bfloat16 autocast (``evaluate --amp``): what runs in bfloat16, what the pool and its
results record, how a resumed build keeps its arithmetic, and how a rerun is judged.

bfloat16 keeps 8 bits of mantissa, so nothing here compares an autocast run to a float32 one bit for bit:
the tests check which arithmetic ran (the dtypes the layers see), what is recorded, and, between the
stacked and the sequential trainer, agreement far inside the gap between two different models.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

import mia_ptq_bench.pool.build as build_module
import mia_ptq_bench.pool.train as train_module
from mia_ptq_bench.data import load_dataset
from mia_ptq_bench.errors import BenchError, CacheError
from mia_ptq_bench.cli import app
from mia_ptq_bench.pool import PoolStore, autocast_for, build_pool, pool_keep_masks
from mia_ptq_bench.pool.train import Schedule, Speed, init_model, make_schedule, train_sequential, train_stacked
from mia_ptq_bench.recompute import RECOMPUTED, recompute_files
from mia_ptq_bench.reproduce import reproduce
from mia_ptq_bench.results.compare import IDENTICAL, RETRAINED_POOL
from mia_ptq_bench.runner import RunOptions, evaluate
from mia_ptq_bench.spec import load_task

from test_pool import Logged, interrupt_after_saving

CPU = torch.device("cpu")


def steps(spec, data, indices: list[int], count: int) -> list[Schedule]:
    keep = pool_keep_masks(spec, len(data.pool))
    out = [make_schedule(spec, np.flatnonzero(keep[i]), len(data.pool), i) for i in indices]
    return [Schedule(s.batches[:count], s.shifts[:count], s.flips[:count]) for s in out]


def output_dtypes(model: nn.Module, kinds: tuple[type, ...]) -> set[torch.dtype]:
    """Records the dtype of every output of the model's layers of ``kinds`` while it trains."""
    seen: set[torch.dtype] = set()
    for module in model.modules():
        if isinstance(module, kinds):
            module.register_forward_hook(lambda m, args, out: seen.add(out.dtype))
    return seen


@pytest.mark.parametrize("amp", [False, True])
def test_autocast_runs_convolutions_in_bfloat16_and_keeps_float32_state(amp: bool) -> None:
    spec = load_task("tiny-cnn")  # BatchNorm CNN
    data = load_dataset(spec.dataset)
    model = init_model(spec, data, 0)
    seen = output_dtypes(model, (nn.Conv2d, nn.Linear))
    trained = train_sequential(spec, data, model, steps(spec, data, [0], 2)[0], CPU, Speed(amp=amp))
    assert seen == ({torch.bfloat16} if amp else {torch.float32})
    # weights, BatchNorm statistics and SGD's state stay float32: only the products are bfloat16
    assert {t.dtype for t in trained.state_dict().values() if t.is_floating_point()} == {torch.float32}


def test_the_stacked_trainer_autocasts_too_and_agrees_with_the_sequential_one(monkeypatch) -> None:
    spec = load_task("tiny-cnn")
    data = load_dataset(spec.dataset)
    indices = [0, 1]
    plans = steps(spec, data, indices, 3)
    alone = [train_sequential(spec, data, init_model(spec, data, i), s, CPU, Speed(amp=True))
             for i, s in zip(indices, plans)]
    seen: list[set[torch.dtype]] = []  # the wide network's convolutions, as it trains
    original = train_module.widen

    def widen_and_watch(*args, **kwargs):
        wide = original(*args, **kwargs)
        seen.append(output_dtypes(wide, (nn.Conv2d,)))
        return wide

    monkeypatch.setattr(train_module, "widen", widen_and_watch)
    stacked = train_stacked(spec, data, [init_model(spec, data, i) for i in indices], plans, CPU, Speed(amp=True))
    assert seen == [{torch.bfloat16}]
    for name, untrained in init_model(spec, data, 0).state_dict().items():
        if not untrained.is_floating_point():
            continue
        a, b, other = alone[0].state_dict()[name], stacked[0].state_dict()[name], stacked[1].state_dict()[name]
        # the same model: apart only by bfloat16 roundings of the same products, summed in another order
        apart = (a - b).norm()
        assert apart <= 0.05 * (a - untrained).norm() + 1e-6, name
        if untrained.dim() > 1:  # another model (its own initialisation and data) is far further away
            assert (other - b).norm() > 20 * apart, name


def test_amp_is_opt_in_on_a_cpu_and_refused_where_bfloat16_would_be_emulated(monkeypatch) -> None:
    monkeypatch.setattr(train_module, "native_bfloat16", lambda device: True)
    assert Speed.for_device(CPU) == Speed()  # float32, the study's arithmetic, unless asked
    assert Speed.for_device(CPU, amp=True) == Speed(amp=True)
    assert Speed.for_device(torch.device("cuda")) == Speed(amp=True, channels_last=True)
    assert Speed.for_device(torch.device("cuda"), amp=False) == Speed(channels_last=True)
    monkeypatch.setattr(train_module, "native_bfloat16", lambda device: False)
    with pytest.raises(BenchError, match=r"amp=True \(--amp\): this cpu has no native bfloat16 arithmetic"):
        Speed.for_device(CPU, amp=True)
    assert Speed.for_device(CPU, amp=False) == Speed()
    assert Speed.for_device(torch.device("cuda")) == Speed(channels_last=True)  # a GPU that would emulate it


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_without_a_gpu_defaults_to_float32_and_refuses_amp_by_name() -> None:
    assert Speed.for_device(torch.device("cuda")) == Speed(channels_last=True)
    with pytest.raises(BenchError, match=r"amp=True \(--amp\): no CUDA GPU is available; leave it out"):
        Speed.for_device(torch.device("cuda:1"), amp=True)


def test_an_avx512_cpu_without_bfloat16_instructions_is_not_native(monkeypatch) -> None:
    """oneDNN's own check accepts any AVX-512 CPU, and emulates bfloat16 on those without AVX512_BF16 or AMX."""
    monkeypatch.setattr(train_module.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    for avx512_bf16, amx, native in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert train_module.native_bfloat16(CPU) is native


def test_a_pool_records_the_arithmetic_each_model_trained_in(tiny_task, tmp_path: Path) -> None:
    data = load_dataset(tiny_task.dataset)
    plain = build_pool(tiny_task, data, tmp_path / "plain", trainer="stacked", stack=4)
    assert plain.store.arithmetic() == "float32"
    assert json.loads(plain.store.record_path(0).read_text())["autocast"] is False
    amp = build_pool(tiny_task, data, tmp_path / "amp", trainer="stacked", stack=4, speed=Speed(amp=True))
    assert amp.store.arithmetic() == "bfloat16-autocast"
    assert json.loads((amp.store.root / "groups.json").read_text())["autocast"] is True
    assert amp.test_accuracy.min() > 0.5 and not np.array_equal(amp.scores, plain.scores)
    assert amp.store.digest() != plain.store.digest()
    # a record from before the field says nothing (CUDA builds autocast by default then), so neither does the pool
    record = amp.store.record_path(3)
    older = {k: v for k, v in json.loads(record.read_text()).items() if k != "autocast"}
    record.write_text(json.dumps(older))
    assert amp.store.problem(3) is None and amp.store.arithmetic() is None
    record.write_text(json.dumps({**older, "autocast": "yes"}))
    assert "autocast: not true or false" in amp.store.problem(3)
    with pytest.raises(CacheError, match="malformed completion record"):
        amp.store.arithmetic()


@pytest.fixture
def started_under_autocast(tiny_task, tmp_path: Path, monkeypatch):
    """A tiny-digits build started under autocast in groups of 4, killed after 5 models, and the same build whole."""
    monkeypatch.setattr(build_module, "native_bfloat16", lambda device: True)
    monkeypatch.setattr(build_module, "auto_workers", lambda *args: 1)
    monkeypatch.setattr(build_module, "auto_stack", lambda *args: 4)
    data = load_dataset(tiny_task.dataset)
    reference = build_pool(tiny_task, data, tmp_path / "reference", speed=Speed(amp=True))
    interrupt_after_saving(5, monkeypatch, lambda: build_pool(tiny_task, data, tmp_path / "resumed",
                                                              speed=Speed(amp=True)))
    return data, reference, tmp_path / "resumed"


def test_a_resumed_build_keeps_its_arithmetic_unless_told_otherwise(tiny_task, started_under_autocast) -> None:
    data, reference, folder = started_under_autocast
    log = Logged()
    resumed = build_pool(tiny_task, data, folder, progress=log)  # nothing asked: as started
    assert log.lines == ["resuming under bfloat16 autocast, as this pool was started (this machine would train in "
                         "float32; --no-amp to do so)"]
    np.testing.assert_array_equal(resumed.scores, reference.scores)
    assert resumed.store.arithmetic() == "bfloat16-autocast"
    # asked for float32, the rest trains in float32, said to differ by more than rounding, and recorded as mixed
    PoolStore(folder, tiny_task).discard(7)
    log = Logged()
    mixed = build_pool(tiny_task, data, folder, progress=log, speed=Speed())
    assert log.lines == ["training in float32, where this pool was started under bfloat16 autocast: its models will "
                         "differ by more than float rounding from an uninterrupted build's (a mixed pool)"]
    assert mixed.store.arithmetic() == "mixed"
    # a complete pool is used as it is, and a run that asked for another arithmetic is told so
    log = Logged()
    build_pool(tiny_task, data, reference.store.cache_dir, progress=log, speed=Speed())
    assert log.lines == ["the pool is cached, trained under bfloat16 autocast: it is used as it is, not trained again "
                         "in float32 (a pool is cached by its task alone)"]
    log = Logged()
    build_pool(tiny_task, data, reference.store.cache_dir, progress=log, speed=Speed(amp=True))
    assert not log.lines


def groups_trained(monkeypatch) -> list[list[int]]:
    groups: list[list[int]] = []
    original = build_module.train_group
    monkeypatch.setattr(build_module, "train_group",
                        lambda spec, data, store, keep, group, *rest: groups.append(list(group)) or
                        original(spec, data, store, keep, group, *rest))
    return groups


def test_chosen_groups_leave_the_arithmetic_as_started(tiny_task, started_under_autocast, monkeypatch) -> None:
    data, reference, folder = started_under_autocast
    groups = groups_trained(monkeypatch)
    log = Logged()
    resumed = build_pool(tiny_task, data, folder, progress=log, trainer="sequential")
    assert groups == [[5], [6], [7]]
    assert log.lines == ["training in groups of 1 models, where this pool was started in groups of 4 models: its "
                         "models will differ in their last bits from an uninterrupted build's",
                         "resuming under bfloat16 autocast, as this pool was started (this machine would train in "
                         "float32; --no-amp to do so)"]
    assert resumed.store.arithmetic() == "bfloat16-autocast"


def test_a_chosen_arithmetic_leaves_the_groups_as_started(tiny_task, started_under_autocast, monkeypatch) -> None:
    data, reference, folder = started_under_autocast
    monkeypatch.setattr(build_module, "auto_stack", lambda *args: 2)  # this machine would choose other groups
    groups = groups_trained(monkeypatch)
    log = Logged()
    resumed = build_pool(tiny_task, data, folder, progress=log, speed=Speed())
    assert groups == [[4, 5, 6, 7]]
    assert log.lines == ["resuming in groups of 4 models, as this pool was started (this machine would choose groups "
                         f"of 2 models; delete {resumed.store.root / 'groups.json'} to let it)",
                         "training in float32, where this pool was started under bfloat16 autocast: its models will "
                         "differ by more than float rounding from an uninterrupted build's (a mixed pool)"]
    assert resumed.store.arithmetic() == "mixed"


@pytest.mark.parametrize("groups_json", ["deleted", "written on another device"])
def test_the_started_arithmetic_is_read_from_the_models_records(tiny_task, started_under_autocast,
                                                               groups_json: str) -> None:
    """groups.json may be gone (as the layout message invites), or be another device's: the records still say."""
    data, reference, folder = started_under_autocast
    groups = PoolStore(folder, tiny_task).root / "groups.json"
    if groups_json == "deleted":
        groups.unlink()
    else:
        groups.write_text(json.dumps({**json.loads(groups.read_text()), "device": "cuda"}))
    log = Logged()
    resumed = build_pool(tiny_task, data, folder, progress=log)
    assert log.lines == ["resuming under bfloat16 autocast, as this pool was started (this machine would train in "
                         "float32; --no-amp to do so)"]
    np.testing.assert_array_equal(resumed.scores, reference.scores)


def test_a_build_started_under_autocast_goes_on_in_float32_where_it_would_be_emulated(
        tiny_task, started_under_autocast, monkeypatch) -> None:
    data, reference, folder = started_under_autocast
    monkeypatch.setattr(build_module, "native_bfloat16", lambda device: False)
    log = Logged()
    resumed = build_pool(tiny_task, data, folder, progress=log)
    assert log.lines == ["this pool was started under bfloat16 autocast, which this cpu lacks natively: its remaining "
                         "models train in float32 (a mixed pool)"]
    assert resumed.store.arithmetic() == "mixed"


def test_worker_processes_train_in_the_asked_arithmetic(tiny_task, tmp_path: Path) -> None:
    data = load_dataset(tiny_task.dataset)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        apart = build_pool(tiny_task, data, tmp_path / "workers", trainer="stacked", stack=2, workers=2,
                           speed=Speed(amp=True))
        torch.set_num_threads(1)
        here = build_pool(tiny_task, data, tmp_path / "here", trainer="stacked", stack=2, workers=1,
                          speed=Speed(amp=True))
    finally:
        torch.set_num_threads(threads)
    assert apart.store.arithmetic() == "bfloat16-autocast"
    np.testing.assert_array_equal(apart.scores, here.scores)  # a worker's groups of 2 on 1 thread, the same bits


def test_reproduce_reads_the_arithmetic_from_the_result_and_the_cpu(monkeypatch) -> None:
    log = Logged()
    monkeypatch.setattr(build_module, "native_bfloat16", lambda device: True)
    assert [autocast_for(a, "cpu", log.log) for a in ("float32", "bfloat16-autocast", "mixed", None)] == \
        [False, True, None, None]
    assert not log.lines
    monkeypatch.setattr(build_module, "native_bfloat16", lambda device: False)
    assert autocast_for("bfloat16-autocast", "cpu", log.log) is False
    assert log.lines == ["the result's pool was trained under bfloat16 autocast, which cpu lacks natively: if the pool "
                         "is not cached, it is trained in float32 (and the rerun held to a retrained pool's tolerance)"]


def test_evaluate_with_amp_records_its_pools_arithmetic(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MPTQ_TASKS", str(Path(__file__).parent / "tasks"))
    monkeypatch.setattr(train_module, "native_bfloat16", lambda device: True)  # any CPU can emulate it, slowly
    outcome = evaluate("rtn", load_task("tiny-digits"), plans=["w2"], threat_models=["oblivious"],
                       options=RunOptions(out_dir=tmp_path / "r", cache_dir=tmp_path / "c", amp=True))
    assert [r.pool_arithmetic for r in outcome.results] == ["bfloat16-autocast"]
    assert outcome.pool.store.arithmetic() == "bfloat16-autocast"
    # reproduced from an empty cache: the pool is trained again under autocast, so the rerun is identical
    monkeypatch.setattr(build_module, "native_bfloat16", lambda device: True)
    again = reproduce(outcome.paths, RunOptions(cache_dir=tmp_path / "empty"))
    assert [(r.regime, r.ok) for r in again] == [(IDENTICAL, True)]
    assert PoolStore(tmp_path / "empty", outcome.pool.spec).arithmetic() == "bfloat16-autocast"
    # --no-amp overrides the result: a float32 pool, other bits, the retrained pool's tolerance
    again = reproduce(outcome.paths, RunOptions(cache_dir=tmp_path / "float32", amp=False))
    assert [r.regime for r in again] == [RETRAINED_POOL]
    assert PoolStore(tmp_path / "float32", outcome.pool.spec).arithmetic() == "float32"
    # validate --recompute from an empty cache trains the pool as the result's was, so it recomputes every number
    checked = recompute_files(outcome.paths, tmp_path / "recompute")
    assert [(c.status, all(x.ok for x in c.comparisons)) for c in checked] == [(RECOMPUTED, True)]
    assert PoolStore(tmp_path / "recompute", outcome.pool.spec).arithmetic() == "bfloat16-autocast"


def test_evaluate_amp_without_native_bfloat16_is_one_error_before_any_work(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MPTQ_TASKS", str(Path(__file__).parent / "tasks"))
    monkeypatch.setattr(train_module, "native_bfloat16", lambda device: False)
    result = CliRunner().invoke(app, ["evaluate", "rtn", "--task", "tiny-digits", "--device", "cpu", "--amp",
                                      "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")])
    message = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "Traceback" not in message, message
    assert "error: amp=True (--amp): this cpu has no native bfloat16 arithmetic" in message, message
    assert not (tmp_path / "r").exists() and not list((tmp_path / "c").glob("pools/*"))
