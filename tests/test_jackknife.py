"""The delete-a-group jackknife that measures how far another draw of the pool moves a result's means."""

from __future__ import annotations

import numpy as np
import pytest

from mia_ptq_bench.attack import THREAT_MODELS
from mia_ptq_bench.metrics.select import NoStandIn
from mia_ptq_bench.results import jackknife as jackknife_module
from mia_ptq_bench.results.compare import RETRAINED_POOL, SAME_POOL, allowed_change
from mia_ptq_bench.results.jackknife import deal_groups, grouped_jackknife, pool_standard_errors
from mia_ptq_bench.spec import load_task
from test_select import pool_of
from mia_ptq_bench.results.schema import Stat


def test_each_group_holds_one_target_and_the_other_models_are_dealt_in_index_order() -> None:
    assert deal_groups([5, 2], [6, 0, 1, 2, 3, 4, 5]) == [[5, 0, 3, 6], [2, 1, 4]]
    assert deal_groups([0, 1, 2], [0, 1, 2]) == [[0], [1], [2]]  # every model a target: one each
    groups = deal_groups(range(16), range(64))
    assert sorted(m for g in groups for m in g) == list(range(64)) and {len(g) for g in groups} == {4}


def test_a_mean_over_targets_alone_gets_exactly_its_standard_error_over_targets() -> None:
    # A number no shadow enters (test accuracy, a global threshold): leaving a group out leaves out its
    # target only, and the jackknife is the usual s / sqrt(n).
    values = np.arange(16, dtype=np.float64) ** 1.5
    groups = deal_groups(range(16), range(64))

    def mean_of_the_rest(left_out: list[int]) -> dict[str, float]:
        return {"m": float(np.delete(values, [m for m in left_out if m < 16]).mean())}

    se = grouped_jackknife(mean_of_the_rest, groups)["m"]
    assert se == pytest.approx(values.std(ddof=1) / 4, rel=1e-12)


def test_what_every_target_shares_widens_the_standard_error() -> None:
    # mean over targets of x plus mean over the 48 shared models of y: a linear statistic of the 16 groups
    # z_k = x_k + (sum of y over group k) / 3, whose jackknife is exactly std(z) / sqrt(16).
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=16), 5 * rng.normal(size=64)
    groups = deal_groups(range(16), range(64))

    def statistic(left_out: list[int]) -> dict[str, float]:
        targets = [t for t in range(16) if t not in left_out]
        shared = [m for m in range(16, 64) if m not in left_out]
        return {"targets only": float(x[targets].mean()), "with shared": float(x[targets].mean() + y[shared].mean())}

    se = grouped_jackknife(statistic, groups)
    z = np.array([x[g[0]] + y[g[1:]].sum() / 3 for g in groups])
    assert se["with shared"] == pytest.approx(z.std(ddof=1) / 4, rel=1e-12)
    assert se["targets only"] == pytest.approx(x.std(ddof=1) / 4, rel=1e-12)
    assert se["with shared"] > 2 * se["targets only"]


def test_one_group_measures_nothing() -> None:
    assert grouped_jackknife(lambda left_out: {"m": 1.0}, deal_groups([3], [1, 2, 3])) == {}


def test_a_retrained_pool_takes_the_jackknife_where_it_exceeds_the_spread_over_targets() -> None:
    stat = Stat(mean=0.5, std=0.04, ci_low=0.48, ci_high=0.52, n=16)  # s / sqrt(n) = 0.01
    assert allowed_change(stat, 1e-4, RETRAINED_POOL) == pytest.approx(6 * 2 ** 0.5 * 0.01)
    assert allowed_change(stat, 1e-4, RETRAINED_POOL, pool_se=0.03) == pytest.approx(6 * 2 ** 0.5 * 0.03)
    assert allowed_change(stat, 1e-4, RETRAINED_POOL, pool_se=0.004) == pytest.approx(6 * 2 ** 0.5 * 0.01)
    assert allowed_change(stat, 1e-4, SAME_POOL, pool_se=0.03) == allowed_change(stat, 1e-4, SAME_POOL)


def test_a_leave_out_that_leaves_a_block_no_stand_in_measures_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # Leaving a group out can leave some block of targets no shadow to choose on (a task whose quantized shadows
    # are barely more than its targets): then nothing is measured and the plain tolerance stays. Any other
    # error is a bug and is raised.
    spec = load_task("tiny-digits")
    keep, informative, _ = pool_of(models=12)
    targets = np.arange(4)
    threat = THREAT_MODELS.get("adaptive")
    shadows = {"full-precision": informative, "same-quantizer": informative}
    args = (spec, keep, targets, informative.scores[:4], np.zeros((4, 10), dtype=int), np.zeros(10, dtype=int),
            threat, [THREAT_MODELS.get("oblivious"), threat], shadows)
    assert set(pool_standard_errors(*args)) >= {"test accuracy", "lira-online AUC", "strongest TPR@1%"}
    real = jackknife_module.attack_targets
    for error, expected in ((NoStandIn("none left"), {}), (ValueError("a bug"), None)):
        calls = []

        def failing_on_a_leave_out(*call, error=error, calls=calls):
            calls.append(1)
            if len(calls) == 2:
                raise error
            return real(*call)

        monkeypatch.setattr(jackknife_module, "attack_targets", failing_on_a_leave_out)
        if expected is None:
            with pytest.raises(ValueError, match="a bug"):
                pool_standard_errors(*args)
        else:
            assert pool_standard_errors(*args) == expected
