"""The bit-width audit: every quantized layer must hold no more values per channel than its plan allows."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import AuditError
from ..models import quantizable_layers
from ..spec.audit import LayerAudit
from ..spec.plans import PrecisionPlan


def distinct_per_row(weight: torch.Tensor) -> torch.Tensor:
    rows = weight.detach().flatten(1).sort(dim=1).values
    return (rows[:, 1:] != rows[:, :-1]).sum(dim=1) + 1


def audit_model(model: nn.Module, plan: PrecisionPlan) -> list[LayerAudit]:
    layers = quantizable_layers(model)
    report = []
    for index, (name, layer) in enumerate(layers):
        report.append(LayerAudit.measured(name, plan.bits_for(index, len(layers)),
                                          int(distinct_per_row(layer.weight).max()), int(layer.weight.shape[0])))
    return report


def enforce_audit(report: list[LayerAudit], plan: PrecisionPlan, who: str) -> None:
    failed = [entry for entry in report if not entry.passed]
    if failed:
        details = "; ".join(f"layer {e.layer}: {e.max_distinct} values in a channel, plan allows {e.allowed_levels}"
                            for e in failed)
        raise AuditError(f"{who} at {plan}: bit-width audit failed, result refused ({details})")
