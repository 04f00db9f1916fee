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
from mia_ptq_bench.pool import PoolStore, build_pool, pool_keep_masks
from mia_ptq_bench.pool.train import Schedule, Speed, init_model, make_schedule, train_sequential, train_stacked
from mia_ptq_bench.cli import app
from mia_ptq_bench.reproduce import _autocast
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
    seen: set[torch.dtype] = set()
    original = train_module.widen

    def widen_and_watch(*args, **kwargs):  # the wide network's convolutions, as it trains
        wide = original(*args, **kwargs)
        for module in wide.modules():
            if isinstance(module, nn.Conv2d):
                module.register_forward_hook(lambda m, a, out: seen.add(out.dtype))
        return wide

    monkeypatch.setattr(train_module, "widen", widen_and_watch)
    stacked = train_stacked(spec, data, [init_model(spec, data, i) for i in indices], plans, CPU, Speed(amp=True))
    assert seen == {torch.bfloat16}
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
    assert Speed.for_device(CPU) == Speed()  # float32, the study's arithmetic
    assert Speed.for_device(torch.device("cuda")) == Speed(amp=True, channels_last=True)
    assert Speed.for_device(torch.device("cuda"), amp=False) == Speed(channels_last=True)
    monkeypatch.setattr(train_module, "native_bfloat16", lambda device: True)
    assert Speed.for_device(CPU, amp=True) == Speed(amp=True)
    monkeypatch.setattr(train_module, "native_bfloat16", lambda device: False)
    with pytest.raises(BenchError, match="--amp: this cpu has no native bfloat16 arithmetic"):
        Speed.for_device(CPU, amp=True)
    assert Speed.for_device(CPU, amp=False) == Speed()


def test_a_pool_records_the_arithmetic_each_model_trained_in(tiny_task, tmp_path: Path) -> None:
    data = load_dataset(tiny_task.dataset)
    plain = build_pool(tiny_task, data, tmp_path / "plain", trainer="stacked", stack=4)
    assert plain.store.arithmetic() == "float32"
    assert "autocast" not in json.loads(plain.store.record_path(0).read_text())  # the records older pools have
    amp = build_pool(tiny_task, data, tmp_path / "amp", trainer="stacked", stack=4, speed=Speed(amp=True))
    assert amp.store.arithmetic() == "bfloat16-autocast"
    assert json.loads((amp.store.root / "groups.json").read_text())["autocast"] is True
    assert amp.test_accuracy.min() > 0.5 and not np.array_equal(amp.scores, plain.scores)
    assert amp.store.digest() != plain.store.digest()
    record = amp.store.record_path(3)
    record.write_text(json.dumps({**json.loads(record.read_text()), "autocast": "yes"}))
    assert "autocast: not true or false" in amp.store.problem(3)
    with pytest.raises(CacheError, match="malformed completion record"):
        amp.store.arithmetic()


def test_a_resumed_build_keeps_its_arithmetic_unless_told_otherwise(tiny_task, tmp_path: Path, monkeypatch) -> None:
    data = load_dataset(tiny_task.dataset)
    amp = Speed(amp=True)
    reference = build_pool(tiny_task, data, tmp_path / "reference", trainer="stacked", stack=4, speed=amp)
    monkeypatch.setattr(build_module, "auto_stack", lambda *args: 4)
    monkeypatch.setattr(build_module, "auto_workers", lambda *args: 1)
    interrupt_after_saving(5, monkeypatch, lambda: build_pool(tiny_task, data, tmp_path / "resumed", speed=amp))
    log = Logged()
    resumed = build_pool(tiny_task, data, tmp_path / "resumed", progress=log)  # nothing asked: as started
    assert any(line.startswith("resuming in groups of 4 models under bfloat16 autocast, as this pool was started")
               for line in log.lines), log.lines
    np.testing.assert_array_equal(resumed.scores, reference.scores)
    assert resumed.store.arithmetic() == "bfloat16-autocast"
    # asked for float32, the rest trains in float32, said to differ by more than rounding, and recorded as mixed
    PoolStore(tmp_path / "resumed", tiny_task).discard(7)
    log = Logged()
    mixed = build_pool(tiny_task, data, tmp_path / "resumed", progress=log, speed=Speed())
    assert any("where this pool was started in groups of 4 models under bfloat16 autocast: its models will differ "
               "by more than float rounding" in line for line in log.lines), log.lines
    assert mixed.store.arithmetic() == "mixed"
    # a complete pool is used as it is, and a run that asked for another arithmetic is told so
    log = Logged()
    build_pool(tiny_task, data, tmp_path / "reference", progress=log, speed=Speed())
    assert any(line.startswith("the pool is cached, trained in bfloat16-autocast: the asked arithmetic applies to "
                               "training only") for line in log.lines), log.lines
    log = Logged()
    build_pool(tiny_task, data, tmp_path / "reference", progress=log, speed=amp)
    assert not log.lines


def test_reproduce_trains_a_missing_pool_in_the_results_arithmetic(monkeypatch) -> None:
    log = Logged()
    monkeypatch.setattr("mia_ptq_bench.reproduce.native_bfloat16", lambda device: True)
    assert [_autocast(a, "cpu", log) for a in ("float32", "bfloat16-autocast", "mixed", None)] == \
        [False, True, None, None]
    assert not log.lines
    monkeypatch.setattr("mia_ptq_bench.reproduce.native_bfloat16", lambda device: False)
    assert _autocast("bfloat16-autocast", "cpu", log) is False
    assert log.lines == ["the result's pool was trained under bfloat16 autocast, which cpu lacks natively: a pool "
                         "missing here is trained in float32 (and the rerun held to a retrained pool's tolerance)"]


def test_evaluate_with_amp_records_its_pools_arithmetic(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MPTQ_TASKS", str(Path(__file__).parent / "tasks"))
    monkeypatch.setattr(train_module, "native_bfloat16", lambda device: True)  # any CPU can emulate it, slowly
    outcome = evaluate("rtn", load_task("tiny-digits"), plans=["w2"], threat_models=["oblivious"],
                       options=RunOptions(out_dir=tmp_path / "r", cache_dir=tmp_path / "c", amp=True))
    assert [r.pool_arithmetic for r in outcome.results] == ["bfloat16-autocast"]
    assert outcome.pool.store.arithmetic() == "bfloat16-autocast"


def test_evaluate_amp_without_native_bfloat16_is_one_error_before_any_work(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MPTQ_TASKS", str(Path(__file__).parent / "tasks"))
    monkeypatch.setattr(train_module, "native_bfloat16", lambda device: False)
    result = CliRunner().invoke(app, ["evaluate", "rtn", "--task", "tiny-digits", "--device", "cpu", "--amp",
                                      "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")])
    message = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "Traceback" not in message, message
    assert "error: --amp: this cpu has no native bfloat16 arithmetic" in message, message
    assert not (tmp_path / "r").exists() and not list((tmp_path / "c").glob("pools/*"))
