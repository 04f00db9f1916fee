"""The bit-width audit record: how many grid values a layer holds against what its plan allows.

Pure data (no torch), so result documents and the validator can carry and check it;
``quantize/audit.py`` measures models into these records.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ..errors import PlanError
from .plans import PrecisionPlan, levels_for_bits


class LayerAudit(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    layer: str
    bits: float | None
    allowed_levels: int | None
    max_distinct: int  # the most distinct weight values held by any output channel
    channels: int
    passed: bool

    @classmethod
    def measured(cls, layer: str, bits: float | None, max_distinct: int, channels: int) -> LayerAudit:
        """The record of a layer holding at most ``max_distinct`` values per channel, judged against ``bits``."""
        allowed = None if bits is None else levels_for_bits(bits)
        return cls(layer=layer, bits=bits, allowed_levels=allowed, max_distinct=max_distinct, channels=channels,
                   passed=allowed is None or max_distinct <= allowed)


def merge_audits(audits: list[list[LayerAudit]]) -> list[LayerAudit]:
    """One record per layer over several models: the worst channel, passed only if every model passed."""
    merged = []
    for layer_entries in zip(*audits, strict=True):
        worst = max(layer_entries, key=lambda a: a.max_distinct)
        merged.append(worst.model_copy(update={"passed": all(a.passed for a in layer_entries)}))
    return merged


def audit_problems(audit: list[LayerAudit], plan: str) -> list[str]:
    """What is wrong with an audit as recorded: each layer's bits and allowed levels are the plan's (the
    last layer is the classifier), and ``passed`` follows from them; the values it counts are recomputed
    from the evidence by ``validate --recompute``."""
    try:
        parsed = PrecisionPlan.parse(plan)
    except PlanError:
        return []  # the file name check reports an unknown plan
    problems = []
    for index, entry in enumerate(audit):
        bits = parsed.bits_for(index, len(audit))
        allowed = None if bits is None else levels_for_bits(bits)
        if entry.bits != bits or entry.allowed_levels != allowed:
            problems.append(f"audit: layer {entry.layer} records {entry.bits} bits ({entry.allowed_levels} values); "
                            f"plan {plan} gives it {bits} bits ({allowed} values)")
        elif entry.passed != (allowed is None or entry.max_distinct <= allowed):
            problems.append(f"audit: layer {entry.layer}: passed is {str(entry.passed).lower()} for "
                            f"{entry.max_distinct} values in a channel where {allowed} are allowed")
        elif not entry.passed:
            problems.append(f"audit: layer {entry.layer} holds {entry.max_distinct} values in a channel, "
                            f"its plan allows {allowed}")
    return problems
