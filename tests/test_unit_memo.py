"""A plan replays the leading units an earlier plan quantized the same way: the same bits, less work."""

from __future__ import annotations

import contextlib
import copy
import pickle
from unittest import mock

import pytest
import torch

from mia_ptq_bench.quantize import QUANTIZERS
from mia_ptq_bench.quantize.memo import UnitMemo, content_key
from mia_ptq_bench.spec import PrecisionPlan

from test_methods import calibration, trained_like

CONFIGS = {
    "adaround": {"iters": 30, "capture_batch": 16},
    "brecq": {"iters": 30, "capture_batch": 16},
    "gptq": {"batch_size": 16},  # sequential: each layer's Hessian from the layers quantized before it
    "obc": {"calibration": 24},
}
# Where each method does a unit's work: counted to see which units were redone.
WORK = {"adaround": "mia_ptq_bench.quantize.reconstruction.learn_rounding",
        "brecq": "mia_ptq_bench.quantize.reconstruction.learn_rounding"}


def group() -> tuple[list[torch.nn.Module], list]:
    model = trained_like("resnet18", width=0.0625)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.1)
    return [model, other], [calibration(24, seed=s) for s in (0, 1)]


def quantize_counting(method: str, quantizer, models, cals, plan: str):
    """The quantized copies, and how many units' work was done (learned roundings or sweeps)."""
    target = WORK.get(method)
    if target is None:
        with mock.patch.object(type(quantizer), "sweep_many", autospec=True,
                               side_effect=type(quantizer).sweep_many) as work:
            out = quantizer.quantize_many([copy.deepcopy(m) for m in models], cals, PrecisionPlan.parse(plan))
    else:
        from mia_ptq_bench.quantize import reconstruction
        with mock.patch(target, wraps=reconstruction.learn_rounding) as work:
            out = quantizer.quantize_many([copy.deepcopy(m) for m in models], cals, PrecisionPlan.parse(plan))
    return out, work.call_count


def assert_same_models(a: list[torch.nn.Module], b: list[torch.nn.Module]) -> None:
    for x, y in zip(a, b, strict=True):
        for (name, u), v in zip(x.state_dict().items(), y.state_dict().values(), strict=True):
            assert torch.equal(u, v), name


@pytest.mark.parametrize("method", ["adaround", "brecq", "gptq", "obc"])
def test_a_plan_that_differs_only_in_the_classifier_redoes_only_the_classifier_and_gets_the_same_bits(method) -> None:
    models, cals = group()
    quantizer = QUANTIZERS.get(method)(CONFIGS[method])
    first, units = quantize_counting(method, quantizer, models, cals, "w2")
    assert units > 2
    replayed, redone = quantize_counting(method, quantizer, models, cals, "w2-last8")
    assert redone == 1  # the classifier alone
    fresh, fresh_units = quantize_counting(method, QUANTIZERS.get(method)(CONFIGS[method]), models, cals, "w2-last8")
    assert fresh_units == units
    assert_same_models(replayed, fresh)
    # ... and the classifier did get its own 8 bits, not the replayed 2
    assert not torch.equal(replayed[0].fc.weight, first[0].fc.weight)


@pytest.mark.parametrize("method", ["brecq", "gptq"])
def test_nothing_is_replayed_where_the_first_unit_differs_or_the_data_or_settings_do(method) -> None:
    models, cals = group()
    quantizer = QUANTIZERS.get(method)(CONFIGS[method])
    _, units = quantize_counting(method, quantizer, models, cals, "w2")
    # w4 gives the first unit other levels: every unit is redone, and equals a fresh run's
    four, redone = quantize_counting(method, quantizer, models, cals, "w4")
    assert redone == units
    assert_same_models(four, quantize_counting(method, QUANTIZERS.get(method)(CONFIGS[method]), models, cals, "w4")[0])
    # other calibration images, other models, or other settings are another group
    assert quantize_counting(method, quantizer, models, [cals[1], cals[0]], "w2")[1] == units
    assert quantize_counting(method, quantizer, models[::-1], cals, "w2")[1] == units
    kept = quantizer.config
    quantizer.config = type(kept)(**dict(CONFIGS[method], per_channel=False))  # the same object, other settings
    assert quantize_counting(method, quantizer, models, cals, "w2")[1] == units
    quantizer.config = kept
    # the same plan again on the same group is all replay
    assert quantize_counting(method, quantizer, models, cals, "w2")[1] == 0


def test_a_quantizer_sent_to_a_worker_process_starts_with_an_empty_memo() -> None:
    models, cals = group()
    quantizer = QUANTIZERS.get("gptq")(CONFIGS["gptq"])
    _, units = quantize_counting("gptq", quantizer, models, cals, "w2")
    travelled = pickle.loads(pickle.dumps(quantizer))
    assert quantize_counting("gptq", travelled, models, cals, "w2")[1] == units
    obc = QUANTIZERS.get("obc")(CONFIGS["obc"])
    obc.quantize_many([copy.deepcopy(m) for m in models], cals, PrecisionPlan.parse("w2"))
    assert obc._hessian_cache.entries and obc._memo.runs
    travelled = pickle.loads(pickle.dumps(obc))
    assert not travelled._hessian_cache.entries and not travelled._memo.runs


@pytest.mark.parametrize("method, config, patches", [
    ("brecq", {}, {"mia_ptq_bench.quantize.reconstruction.forward_plan": None}),  # captured from the images
    ("adaround", {"inputs": "full_precision"}, {}),
    ("adaround", {"bn": "keep"}, {}),
    ("gptq", {"sequential": False}, {}),
    ("gptq", {}, {"mia_ptq_bench.pool.train.device_memory": 1.0}),  # carried passes do not fit: one pass per layer
])
def test_replay_gives_the_plans_own_bits_on_every_path(method, config, patches) -> None:
    models, cals = group()
    settings = dict(CONFIGS[method], **config)
    quantizer, alone = QUANTIZERS.get(method)(settings), QUANTIZERS.get(method)(settings)
    with contextlib.ExitStack() as stack:
        for target, value in patches.items():
            stack.enter_context(mock.patch(target, return_value=value))
        _, units = quantize_counting(method, quantizer, models, cals, "w2")
        replayed, redone = quantize_counting(method, quantizer, models, cals, "w2-last8")
        fresh, _ = quantize_counting(method, alone, models, cals, "w2-last8")
    assert units > 2 and redone == 1
    assert_same_models(replayed, fresh)


def test_a_method_that_says_it_cannot_replay_redoes_every_unit() -> None:
    class NoReplay(type(QUANTIZERS.get("gptq")())):
        replays = False

    models, cals = group()
    quantizer = NoReplay(CONFIGS["gptq"])
    _, units = quantize_counting("gptq", quantizer, models, cals, "w2")
    assert quantize_counting("gptq", quantizer, models, cals, "w2-last8")[1] == units


def test_the_group_key_reads_the_architecture_and_any_dtype() -> None:
    cal = calibration(8)
    narrow = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, stride=1), torch.nn.Flatten())
    strided = copy.deepcopy(narrow)
    strided[0].stride = (2, 2)  # the same parameters, another computation
    assert content_key([narrow], [cal], ()) != content_key([strided], [cal], ())
    half = copy.deepcopy(narrow).to(torch.bfloat16)
    key = content_key([half], [cal], ())
    with torch.no_grad():
        half[0].weight[0, 0, 0, 0] += 1
    assert content_key([half], [cal], ()) != key
    assert content_key([narrow], [cal], ("a",)) != content_key([narrow], [cal], ("b",))
    gained, regained = copy.deepcopy(narrow), copy.deepcopy(narrow)
    gained.register_buffer("gain", torch.ones(1), persistent=False)  # read by a forward, kept by no state dict
    regained.register_buffer("gain", torch.full((1,), 2.0), persistent=False)
    assert content_key([gained], [cal], ()) != content_key([regained], [cal], ())


def weights(value: float) -> list[dict[str, torch.Tensor]]:
    return [{"layer": torch.full((4,), value)}]  # one model, 16 bytes


def test_the_memo_replays_the_longest_matching_run_of_units() -> None:
    memo = UnitMemo()
    first = memo.replay("g", ["a", "b", "c"])
    for position, value in enumerate((1.0, 2.0, 3.0)):
        assert first.known(position) is None
        first.remember(position, weights(value))
    second = memo.replay("g", ["a", "x", "c"])  # matches the first unit only
    assert second.known(0)[0]["layer"].tolist() == [1.0] * 4
    assert second.known(1) is None and second.known(2) is None
    second.remember(1, weights(9.0))
    second.remember(2, weights(8.0))
    third = memo.replay("g", ["a", "x", "c", "d"])  # the second run matches three units, the first one
    assert [third.known(p)[0]["layer"][0].item() for p in range(3)] == [1.0, 9.0, 8.0]
    assert third.known(3) is None
    assert memo.replay("other group", ["a", "b", "c"]).known(0) is None
    with pytest.raises(ValueError, match="out of order"):
        third.remember(5, weights(0.0))


def test_the_memo_keeps_what_it_remembers_as_its_own_host_copy() -> None:
    memo = UnitMemo()
    kept = memo.replay("g", ["a"])
    mine = weights(1.0)
    kept.remember(0, mine)
    mine[0]["layer"].fill_(7.0)  # the caller goes on changing its tensor
    assert memo.replay("g", ["a"]).known(0)[0]["layer"].tolist() == [1.0] * 4


def test_beyond_its_budget_the_memo_drops_the_oldest_runs_so_the_last_plans_groups_survive() -> None:
    # The runner's order: plan after plan, each over groups g1, g2. With room for one plan's runs, the
    # next plan must still find both groups (a least-recently-used rule would lose each just in time).
    memo = UnitMemo(budget=32)  # two 16-byte units
    for plan in ("w4", "w1.58"):
        for group in ("g1", "g2"):
            memo.replay(group, [plan]).remember(0, weights(1.0))
    assert memo.replay("g1", ["w1.58"]).known(0) is not None
    assert memo.replay("g2", ["w1.58"]).known(0) is not None
    assert memo.replay("g1", ["w4"]).known(0) is None


def test_a_plan_that_outgrows_the_budget_alone_stops_copying_its_units() -> None:
    memo = UnitMemo(budget=40)  # two units fit, three do not
    replay = memo.replay("g", ["a", "b", "c", "d"])
    replay.remember(0, weights(1.0))
    replay.remember(1, weights(2.0))
    assert not replay.dropped
    replay.remember(2, weights(3.0))
    assert replay.dropped and memo.runs == []
    replay.remember(3, weights(4.0))  # still in order, still not kept
    assert memo.runs == [] and len(replay.run) == 3
    with pytest.raises(ValueError, match="out of order"):
        replay.remember(3, weights(4.0))
    nothing = UnitMemo(budget=0)
    nothing.replay("g", ["a"]).remember(0, weights(1.0))
    assert nothing.replay("g", ["a"]).known(0) is None


def test_a_run_that_a_later_plan_extends_is_kept_once_and_pure_replays_keep_nothing_new() -> None:
    memo = UnitMemo()
    first = memo.replay("g", ["a", "b"])
    first.remember(0, weights(1.0))
    assert len(memo.runs) == 1
    longer = memo.replay("g", ["a", "b", "c"])
    assert longer.known(0) is not None and longer.known(1) is None
    longer.remember(1, weights(2.0))
    longer.remember(2, weights(3.0))
    assert [len(run) for _, run in memo.runs] == [3]  # the one-unit run lives on inside the new one
    memo.replay("g", ["a", "b"])  # all replayed, nothing remembered
    branch = memo.replay("g", ["a", "x"])
    branch.remember(1, weights(4.0))
    assert sorted(len(run) for _, run in memo.runs) == [2, 3]


def test_full_precision_hessians_that_do_not_all_fit_are_still_found_plan_after_plan() -> None:
    from mia_ptq_bench.quantize.second_order import _HessianCache

    def hessian() -> dict[str, torch.Tensor]:
        return {"layer": torch.zeros(4)}  # 16 bytes

    cache = _HessianCache(budget=48)  # room for three models' Hessians, and the grid has five
    found = []
    for _plan in range(3):  # the runner's order: every plan over the same models in the same order
        hits = 0
        for model in "abcde":
            if cache.get(model) is not None:
                hits += 1
            else:
                cache.put(model, hessian())
        found.append(hits)
    assert found == [0, 2, 2]  # all but the newest slot, every plan after the first
    assert len(cache.entries) == 3
    one_by_one = _HessianCache(budget=48)  # each model through all its plans before the next
    misses = 0
    for model in "abcde":
        for _plan in range(3):
            if one_by_one.get(model) is None:
                misses += 1
                one_by_one.put(model, hessian())
    assert misses == 5
    one_by_one.put("too big", {"layer": torch.zeros(13)})
    assert "too big" not in one_by_one.entries
