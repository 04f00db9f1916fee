"""Precision plans: how many bits each quantized layer gets.

Grammar: ``fp32`` (no quantization) or ``w<B>[-last<B>]`` where ``B`` is an integer
from 1 to 16 or ``1.58`` (ternary: three grid values). ``w1.58-last8`` quantizes
every layer to three values except the classifier, which keeps 256.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import PlanError

TERNARY_BITS = 1.58
_BITS = r"(1\.58|1[0-6]|[1-9])"
_PLAN = re.compile(rf"^w{_BITS}(?:-last{_BITS})?$")


def levels_for_bits(bits: float) -> int:
    """Grid values a layer may hold at this precision (ternary = 3, b bits = 2**b)."""
    if bits == TERNARY_BITS:
        return 3
    if float(bits).is_integer() and 1 <= bits <= 16:
        return 2 ** int(bits)
    raise PlanError(f"{bits} bits is not a supported precision (integers 1-16, or 1.58)")


def _format_bits(bits: float) -> str:
    return "1.58" if bits == TERNARY_BITS else str(int(bits))


@dataclass(frozen=True)
class PrecisionPlan:
    bits: float | None
    last_bits: float | None = None

    @classmethod
    def parse(cls, text: str) -> PrecisionPlan:
        text = text.strip()
        if text == "fp32":
            return cls(bits=None)
        match = _PLAN.match(text)
        if not match:
            raise PlanError(
                f"cannot parse precision plan {text!r}: expected 'fp32' or 'w<bits>[-last<bits>]' "
                "with bits an integer 1-16 or 1.58 (e.g. w4, w2, w1.58, w1.58-last8)"
            )
        bits, last = match.groups()
        return cls(bits=float(bits), last_bits=float(last) if last else None)

    @property
    def is_full_precision(self) -> bool:
        return self.bits is None

    def bits_for(self, layer_index: int, n_layers: int) -> float | None:
        """Bits for the ``layer_index``-th of ``n_layers`` quantizable layers (last = classifier)."""
        if self.bits is None:
            return None
        if self.last_bits is not None and layer_index == n_layers - 1:
            return self.last_bits
        return self.bits

    def __str__(self) -> str:
        if self.bits is None:
            return "fp32"
        text = f"w{_format_bits(self.bits)}"
        if self.last_bits is not None:
            text += f"-last{_format_bits(self.last_bits)}"
        return text
