"""Everything a quantizer plugin needs, in one import.

    from mia_ptq_bench.plugin import Quantizer, QuantizerConfig, Calibration, PrecisionPlan, layer_levels, fit_grid

See docs/submit.md and submissions/example-stochastic-rounding/ for a worked example.
"""

from .models import quantizable_layers
from .quantize import Calibration, Grid, Quantizer, QuantizerConfig, fit_grid, fit_grids, register_quantizer
from .quantize.common import layer_levels
from .spec import PrecisionPlan, levels_for_bits

__all__ = ["Calibration", "Grid", "PrecisionPlan", "Quantizer", "QuantizerConfig", "fit_grid", "fit_grids", "layer_levels",
           "levels_for_bits", "quantizable_layers", "register_quantizer"]
