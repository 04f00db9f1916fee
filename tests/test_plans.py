from __future__ import annotations

import pytest

from mia_ptq_bench.errors import PlanError
from mia_ptq_bench.spec import PrecisionPlan, levels_for_bits


@pytest.mark.parametrize("text, bits, last", [
    ("w4", 4.0, None), ("w2", 2.0, None), ("w1.58", 1.58, None), ("w1.58-last8", 1.58, 8.0),
    ("w16", 16.0, None), ("w3-last4", 3.0, 4.0), ("fp32", None, None),
])
def test_parse_and_round_trip(text: str, bits, last) -> None:
    plan = PrecisionPlan.parse(text)
    assert (plan.bits, plan.last_bits) == (bits, last)
    assert str(plan) == text


@pytest.mark.parametrize("junk", ["", "4", "w", "w0", "w17", "w1.5", "w04", "w4-last", "w4-first8", "w4 last8",
                                  "W4", "w4-last8-last2", "int8", "w-1"])
def test_junk_is_rejected(junk: str) -> None:
    with pytest.raises(PlanError, match="cannot parse precision plan"):
        PrecisionPlan.parse(junk)


def test_levels() -> None:
    assert [levels_for_bits(b) for b in (1, 1.58, 2, 4, 8)] == [2, 3, 4, 16, 256]
    with pytest.raises(PlanError):
        levels_for_bits(2.5)


def test_last_layer_bits() -> None:
    plan = PrecisionPlan.parse("w1.58-last8")
    assert [plan.bits_for(i, 4) for i in range(4)] == [1.58, 1.58, 1.58, 8.0]
    assert [PrecisionPlan.parse("w2").bits_for(i, 3) for i in range(3)] == [2.0, 2.0, 2.0]
    assert PrecisionPlan.parse("fp32").bits_for(0, 3) is None
