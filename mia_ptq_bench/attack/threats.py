"""Threat models: what the attacker knows, hence which models its shadows are.

- ``oblivious`` (the study's): the shadows are the full-precision pool models; the attacker
  does not know the target was quantized.
- ``adaptive-rtn``: the attacker knows the precision plan but not the method, and quantizes
  its shadows with round-to-nearest at that plan: a cheap proxy that needs no run of the
  method under test.
- ``adaptive``: the attacker knows the quantizer and the plan, and quantizes its shadows the
  same way. A defence is only credible against this attacker.

Knowledge is ordered: an attacker may also use every strategy of a less informed one, which
is how the strongest attack is chosen (``metrics/select.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..registry import Registry

ShadowSource = Literal["full-precision", "rtn", "same-quantizer"]


@dataclass(frozen=True)
class ThreatModel:
    name: str
    shadows: ShadowSource
    knowledge: int  # higher knows more; its strategies include those of every lower one
    description: str


THREAT_MODELS: Registry[ThreatModel] = Registry("threat model")
for _threat in (
    ThreatModel("oblivious", "full-precision", 0, "shadows are the full-precision pool models (the study's attacker)"),
    ThreatModel("adaptive-rtn", "rtn", 1, "knows the plan: shadows quantized with round-to-nearest at that plan"),
    ThreatModel("adaptive", "same-quantizer", 2, "knows the quantizer: shadows quantized the same way at that plan"),
):
    THREAT_MODELS.add(_threat.name, _threat)
