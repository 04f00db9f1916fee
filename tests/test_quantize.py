from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from mia_ptq_bench.errors import AuditError
from mia_ptq_bench.models import build_model, quantizable_layers
from mia_ptq_bench.quantize import QUANTIZERS, Calibration, audit_model, enforce_audit, fit_grid
from mia_ptq_bench.quantize.audit import distinct_per_row
from mia_ptq_bench.quantize.grid import minmax_grid
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
        assert ((weight - lp).abs().pow(2.4).mean(1) <= (weight - mm).abs().pow(2.4).mean(1) + 1e-7).all()


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
    with pytest.raises(AuditError, match=r"audit failed.*5 values in a channel, plan allows 4"):
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
