"""Quantizers behind a registry, precision plans applied per layer, and the bit-width audit."""

from . import builtin as _builtin  # noqa: F401  (registers fp32 and rtn)
from . import reconstruction as _reconstruction  # noqa: F401  (registers adaround and brecq)
from . import second_order as _second_order  # noqa: F401  (registers obc and gptq)
from .audit import LayerAudit, audit_model, enforce_audit
from .calibration import Calibration
from .base import QUANTIZERS, Quantizer, QuantizerConfig, register_quantizer
from .grid import Grid, fit_grid, fit_grids

__all__ = ["QUANTIZERS", "Calibration", "Grid", "LayerAudit", "Quantizer", "QuantizerConfig", "audit_model", "enforce_audit",
           "fit_grid", "fit_grids", "register_quantizer"]
