from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from mia_ptq_bench.errors import AuditError
from mia_ptq_bench.models import build_model, quantizable_layers
from mia_ptq_bench.quantize import QUANTIZERS, Calibration, audit_model, enforce_audit, fit_grid
from mia_ptq_bench.quantize.audit import distinct_per_row
from mia_ptq_bench.quantize.grid import fit_grids, minmax_grid
from mia_ptq_bench.spec import PrecisionPlan
from mia_ptq_bench.spec.schema import ModelSpec


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelSpec(arch="cnn", width=0.25, options={"batchnorm": True, "hidden": 16}), (1, 16, 16), 10)


def calibration(count: int = 16, side: int = 16) -> Calibration:
    raw = torch.randint(0, 256, (count, 1, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return Calibration(raw, lambda x: x.float() / 255.0 - 0.5)


def rtn(model: nn.Module, plan: str, bn: str = "keep") -> nn.Module:
    return QUANTIZERS.get("rtn")({"bn": bn}).quantize(copy.deepcopy(model), calibration(), PrecisionPlan.parse(plan))


@pytest.mark.parametrize("levels", [2, 3, 4, 16])
def test_grid_holds_exactly_its_levels(levels: int) -> None:
    torch.manual_seed(0)
    weight = torch.randn(6, 400)
    grid = fit_grid(weight, levels)
    quantized = grid.round_to_nearest(weight)
    distinct = distinct_per_row(quantized)
    assert (distinct <= levels).all()
    # Rounding the zero point can shift the grid by up to half a step past one end of the
    # searched range, so one extreme level may stay unused; every other level is reached.
    assert (distinct >= levels - 1).all()
    assert (distinct == levels).any()
    integers = grid.integers(weight)
    assert integers.min() >= 0 and integers.max() <= levels - 1


def test_ternary_grid_is_minus_zero_plus_for_symmetric_channels() -> None:
    torch.manual_seed(1)
    weight = torch.randn(4, 1000)
    weight[:, 0], weight[:, 1] = 5.0, -5.0  # symmetric range
    values = fit_grid(weight, 3).round_to_nearest(weight)
    for row in values:
        low, mid, high = torch.unique(row).tolist()
        assert mid == 0.0 and low == pytest.approx(-high)


def test_lp_search_beats_minmax_on_heavy_tails() -> None:
    torch.manual_seed(2)
    weight = torch.distributions.StudentT(2.0).sample((8, 512))
    for levels in (3, 4, 16):
        lp = fit_grid(weight, levels).round_to_nearest(weight)
        mm = minmax_grid(weight, levels).round_to_nearest(weight)
        lp_error, mm_error = (weight - lp).abs().pow(2.4).mean(1), (weight - mm).abs().pow(2.4).mean(1)
        # a strict gain on every row (min-max, the search's first candidate, is beaten by at least 1%)
        assert (lp_error < 0.99 * mm_error).all(), (levels, lp_error / mm_error)


def shrink_search_by_hand(row: np.ndarray, levels: int) -> list[tuple[float, float, float]]:
    """(mean |w - q(w)|^2.4, scale, zero point) of each documented candidate: [min, max] shrunk by 0, 1, ..., 79%."""
    low, high = float(row.min()), float(row.max())
    candidates = []
    for step in range(80):
        shrink = 1 - step / 100
        scale = (high * shrink - low * shrink) / (levels - 1)
        zero = np.round(-low * shrink / scale)
        q = np.clip(np.round(row / scale) + zero, 0, levels - 1)
        candidates.append((float(np.mean(np.abs(row - (q - zero) * scale) ** 2.4)), scale, float(zero)))
    return candidates


def on_the_grid_of(levels: int, low: float, high: float, step: int, copies: int = 100) -> np.ndarray:
    """A row spanning [low, high] once, with ``copies`` weights on every level of the grid shrunk by ``step``%."""
    shrink = 1 - step / 100
    scale = (high - low) * shrink / (levels - 1)
    grid = (np.arange(levels) - round(-low * shrink / scale)) * scale
    return np.r_[low, high, np.repeat(grid, copies)].astype(np.float32)


@pytest.mark.parametrize("levels, rows", [
    (3, [(-0.5, 3.0, 21), (-0.25, 2.0, 23)]),
    (4, [(-0.25, 2.0, 21), (-0.5, 4.0, 23)]),
    (16, [(-0.25, 3.0, 21), (-0.25, 3.0, 23)]),
])
def test_lp_search_picks_the_best_of_the_80_documented_shrinks(levels: int, rows) -> None:
    """Rows whose best candidate is an odd shrink past 20% (out of reach of a 2% step or of 20 candidates),
    ahead of every other candidate by at least 5%, against a plain float64 loop over the candidates."""
    weight = np.stack([on_the_grid_of(levels, *row) for row in rows])
    grid = fit_grid(torch.from_numpy(weight), levels)
    for index, (_, _, step) in enumerate(rows):
        candidates = shrink_search_by_hand(weight[index].astype(np.float64), levels)
        errors = [error for error, _, _ in candidates]
        ranked = np.argsort(errors, kind="stable")
        assert ranked[0] == step  # the row was built for it...
        assert errors[ranked[1]] > 1.05 * errors[ranked[0]]  # ...and no rounding can reorder the two best
        _, scale, zero = candidates[step]
        assert grid.scale[index, 0].item() == pytest.approx(scale, rel=1e-5)
        assert grid.zero_point[index, 0].item() == zero


@pytest.mark.parametrize("levels", [3, 4, 16])
def test_grids_searched_together_are_each_weights_own(levels: int) -> None:
    # Every row's search reads only its own row, so stacking the models' rows changes no grid.
    weights = [torch.randn(6, 72, generator=torch.Generator().manual_seed(i)) * (i + 1) for i in range(4)]
    weights[2][3] = 0.0  # a dead channel: its scale is the floor, as alone
    weights[1][0, :] = torch.linspace(-1, 1, 72)  # evenly spread: many shrinks come close
    together = fit_grids(weights, levels)
    for weight, grid in zip(weights, together):
        alone = fit_grid(weight, levels)
        assert torch.equal(grid.scale, alone.scale) and torch.equal(grid.zero_point, alone.zero_point)
        assert grid.levels == levels


def test_single_row_weights_are_searched_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # With several threads torch sums one long row in parallel pieces, but the same row among others
    # in one piece: stacked, a one-channel layer's mean error could differ in the last bit (a near-tie
    # between two shrinks then picks another grid), so such weights are never stacked.
    from mia_ptq_bench.quantize import grid as grid_module

    rows = [torch.randn(1, 4096, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    searched = []
    original = grid_module.fit_grid
    monkeypatch.setattr(grid_module, "fit_grid", lambda w, *a, **k: searched.append(w.shape) or original(w, *a, **k))
    together = fit_grids(rows, 4)
    assert searched == [(1, 4096)] * 3
    for row, grid in zip(rows, together):
        assert torch.equal(grid.scale, original(row, 4).scale)


def test_grids_are_searched_in_chunks_of_bounded_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from mia_ptq_bench.quantize import grid as grid_module

    weights = [torch.randn(4, 18, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    monkeypatch.setattr(grid_module, "STACKED_ELEMENTS", 2 * 4 * 18)  # two weights per search
    searched = []
    original = grid_module.fit_grid
    monkeypatch.setattr(grid_module, "fit_grid", lambda w, *a, **k: searched.append(w.shape) or original(w, *a, **k))
    together = fit_grids(weights, 4)
    assert searched == [(8, 18), (8, 18), (4, 18)]
    for weight, grid in zip(weights, together):
        assert torch.equal(grid.scale, original(weight, 4).scale)
    assert fit_grids([], 4) == []


def test_grids_of_other_shapes_or_per_tensor_are_searched_one_by_one() -> None:
    a, b = torch.randn(4, 9), 3 * torch.randn(4, 18)
    mixed = fit_grids([a, b], 4)
    assert [g.scale.shape for g in mixed] == [(4, 1), (4, 1)]
    assert torch.equal(mixed[1].scale, fit_grid(b, 4).scale)
    per_tensor = fit_grids([a, 10 * a], 4, per_channel=False)
    assert [g.scale.shape for g in per_tensor] == [(1, 1), (1, 1)]
    assert torch.equal(per_tensor[1].scale, fit_grid(10 * a, 4, per_channel=False).scale)


@pytest.mark.parametrize("bn", ["fold", "keep"])
def test_rtn_on_a_group_gives_each_model_what_it_gets_alone(bn: str) -> None:
    models = []
    for seed in range(3):
        model, generator = small_cnn(), torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
            for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
                # fold scales each model's weights by its own statistics
                norm.running_mean.copy_(torch.rand(norm.running_mean.shape, generator=generator) - 0.5)
                norm.running_var.copy_(0.5 + torch.rand(norm.running_var.shape, generator=generator))
        models.append(model)
    quantizer = QUANTIZERS.get("rtn")({"bn": bn})
    plan = PrecisionPlan.parse("w2")
    together = quantizer.quantize_many([copy.deepcopy(m) for m in models], [calibration() for _ in models], plan)
    for model, grouped in zip(models, together):
        alone = quantizer.quantize(copy.deepcopy(model), calibration(), plan)
        assert alone.state_dict().keys() == grouped.state_dict().keys()
        for (name, a), b in zip(alone.state_dict().items(), grouped.state_dict().values()):
            assert torch.equal(a, b), name
    first = next(name for name, _ in quantizable_layers(models[0]))
    assert not torch.equal(together[0].get_submodule(first).weight, together[1].get_submodule(first).weight)


@pytest.mark.parametrize("search", ["mse", "LP", ""])
def test_an_unknown_grid_search_is_refused_not_read_as_lp(search: str) -> None:
    with pytest.raises(ValueError, match=f"search={search!r}: one of 'lp', 'minmax'"):
        fit_grid(torch.ones(2, 3), 4, search=search)
    for weights in ([torch.ones(2, 3)] * 2, []):
        with pytest.raises(ValueError, match="one of 'lp', 'minmax'"):
            fit_grids(weights, 4, search=search)


def test_the_grid_searches_a_config_offers_are_those_fit_grid_knows() -> None:
    from typing import get_args

    from mia_ptq_bench.quantize.common import GridConfig
    from mia_ptq_bench.quantize.grid import SEARCHES

    assert get_args(GridConfig.model_fields["search"].annotation) == SEARCHES


def test_per_tensor_grid_shares_one_scale() -> None:
    weight = torch.randn(5, 50)
    assert fit_grid(weight, 4, per_channel=False).scale.shape == (1, 1)


@pytest.mark.parametrize("plan, levels", [("w4", 16), ("w2", 4), ("w1.58", 3)])
def test_rtn_plans_pass_the_audit(plan: str, levels: int) -> None:
    quantized = rtn(small_cnn(), plan)
    report = audit_model(quantized, PrecisionPlan.parse(plan))
    assert [r.layer for r in report] == [name for name, _ in quantizable_layers(quantized)]
    assert all(r.passed and r.max_distinct <= levels for r in report)
    assert max(r.max_distinct for r in report) == levels


def test_last8_keeps_256_levels_for_the_classifier_only() -> None:
    model = small_cnn()
    quantized = rtn(model, "w1.58-last8")
    report = audit_model(quantized, PrecisionPlan.parse("w1.58-last8"))
    assert [r.allowed_levels for r in report] == [3] * (len(report) - 1) + [256]
    assert report[-1].max_distinct > 3
    assert all(r.max_distinct <= 3 for r in report[:-1])


def test_rtn_changes_only_quantizable_weights() -> None:
    model = small_cnn()
    quantized = rtn(model, "w2")
    before, after = model.state_dict(), quantized.state_dict()
    weights = {f"{name}.weight" for name, _ in quantizable_layers(model)}
    for key in before:
        same = torch.equal(before[key], after[key])
        assert same != (key in weights), key


def test_audit_catches_an_off_plan_layer() -> None:
    plan = PrecisionPlan.parse("w2")
    quantized = rtn(small_cnn(), "w2")
    with torch.no_grad():
        quantizable_layers(quantized)[1][1].weight[0, 0, 0, 0] += 0.123  # a fifth value in one channel
    report = audit_model(quantized, plan)
    assert [r.passed for r in report].count(False) == 1
    layer = quantizable_layers(quantized)[1][0]
    with pytest.raises(AuditError, match=rf"audit failed.*\(layer {layer}: 5 values in a channel, plan allows 4\)"):
        enforce_audit(report, plan, "test")


def test_fp32_and_rtn_refuse_plans_they_cannot_serve() -> None:
    assert QUANTIZERS.get("fp32")().unsupported(PrecisionPlan.parse("w4"))
    assert QUANTIZERS.get("fp32")().unsupported(PrecisionPlan.parse("fp32")) is None
    assert QUANTIZERS.get("rtn")().unsupported(PrecisionPlan.parse("fp32"))


def test_config_hash_tracks_config() -> None:
    rtn_cls = QUANTIZERS.get("rtn")
    a, b = rtn_cls().describe(), rtn_cls({"search": "minmax"}).describe()
    assert a["config_hash"] != b["config_hash"] and a["config"]["p"] == 2.4
    with pytest.raises(Exception, match="extra"):
        rtn_cls({"bogus": 1})


def test_bn_policies() -> None:
    model = small_cnn()
    model.train()
    model(torch.randn(32, 1, 16, 16))  # non-trivial running statistics
    model.eval()
    folded = rtn(model, "w4", bn="fold")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert folded[0].bias is not None  # the BN shift moved into the conv bias
    kept = rtn(model, "w4", bn="keep")
    assert torch.equal(kept[1].running_mean, model[1].running_mean)
    reestimated = rtn(model, "w4", bn="reestimate")
    assert not torch.allclose(reestimated[1].running_mean, model[1].running_mean)
    assert QUANTIZERS.get("rtn")({"bn": "study"}).bn_policy == "keep"


def test_a_builtin_subclass_with_its_own_quantize_is_that_method_for_groups_too() -> None:
    # The built-ins quantize groups in their own quantize_many, which never called a subclass's quantize:
    # an "RTN, then zero the classifier" subclass was plain RTN in every run.
    from mia_ptq_bench.quantize.builtin import RoundToNearest

    calls = []

    class ZeroedClassifier(RoundToNearest):
        name = "zeroed-classifier"

        def quantize(self, model, calibration, plan):
            calls.append(plan)
            model = super().quantize(model, calibration, plan)  # the built-in way, for one model
            with torch.no_grad():
                quantizable_layers(model)[-1][1].weight.zero_()
            return model

    models = [small_cnn() for _ in range(3)]
    out = ZeroedClassifier().quantize_many(models, [calibration(8)] * 3, PrecisionPlan.parse("w2"))
    assert len(calls) == 3
    for model in out:
        layers = quantizable_layers(model)
        assert (layers[-1][1].weight == 0).all() and (distinct_per_row(layers[0][1].weight) <= 4).all()
