"""The bit-width audit: every quantized layer must hold no more values per channel than its plan allows."""

from __future__ import annotations

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from ..errors import AuditError
from ..models import quantizable_layers
from ..spec.plans import PrecisionPlan, levels_for_bits


class LayerAudit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layer: str
    bits: float | None
    allowed_levels: int | None
    max_distinct: int  # the most distinct weight values held by any output channel
    channels: int
    passed: bool


def distinct_per_row(weight: torch.Tensor) -> torch.Tensor:
    rows = weight.detach().flatten(1).sort(dim=1).values
    return (rows[:, 1:] != rows[:, :-1]).sum(dim=1) + 1


def audit_model(model: nn.Module, plan: PrecisionPlan) -> list[LayerAudit]:
    layers = quantizable_layers(model)
    report = []
    for index, (name, layer) in enumerate(layers):
        bits = plan.bits_for(index, len(layers))
        allowed = None if bits is None else levels_for_bits(bits)
        distinct = int(distinct_per_row(layer.weight).max())
        report.append(LayerAudit(layer=name, bits=bits, allowed_levels=allowed, max_distinct=distinct,
                                 channels=int(layer.weight.shape[0]), passed=allowed is None or distinct <= allowed))
    return report


def enforce_audit(report: list[LayerAudit], plan: PrecisionPlan, who: str) -> None:
    failed = [entry for entry in report if not entry.passed]
    if failed:
        details = "; ".join(f"{e.layer}: {e.max_distinct} values in a channel, plan allows {e.allowed_levels}"
                            for e in failed)
        raise AuditError(f"{who} at {plan}: bit-width audit failed, result refused ({details})")
