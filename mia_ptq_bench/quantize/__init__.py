"""Quantizers behind a registry, precision plans applied per layer, and the bit-width audit."""

from . import builtin as _builtin  # noqa: F401  (registers fp32 and rtn)
from .audit import LayerAudit, audit_model, enforce_audit
from .base import QUANTIZERS, Quantizer, QuantizerConfig, register_quantizer
from .grid import Grid, fit_grid

__all__ = ["QUANTIZERS", "Grid", "LayerAudit", "Quantizer", "QuantizerConfig", "audit_model", "enforce_audit",
           "fit_grid", "register_quantizer"]
