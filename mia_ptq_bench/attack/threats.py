"""Threat models: which models the attacker's shadows are.

- ``oblivious`` (the study's): the shadows are the full-precision pool models; the attacker
  does not know the target was quantized.
- ``adaptive``: the attacker knows the quantizer and the plan, and quantizes its shadows the
  same way. A defence is only credible against this attacker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..registry import Registry


@dataclass(frozen=True)
class ThreatModel:
    name: str
    shadows: Literal["full-precision", "same-quantizer"]
    description: str


THREAT_MODELS: Registry[ThreatModel] = Registry("threat model")
for _threat in (
    ThreatModel("oblivious", "full-precision", "shadows are the full-precision pool models (the study's attacker)"),
    ThreatModel("adaptive", "same-quantizer", "shadows are quantized with the same quantizer and plan"),
):
    THREAT_MODELS.add(_threat.name, _threat)
