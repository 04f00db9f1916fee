"""The bit-width audit record: how many grid values a layer holds against what its plan allows.

Pure data (no torch), so result documents and the validator can carry and check it;
``quantize/audit.py`` measures models into these records.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from .plans import levels_for_bits


class LayerAudit(BaseModel):
    model_config = ConfigDict(extra="forbid")

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
