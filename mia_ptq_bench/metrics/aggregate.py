"""Aggregation over targets: mean, sample std and a 95% Student-t interval."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float
    ci_low: float
    ci_high: float
    n: int


def summarize(values: list[float] | np.ndarray, bounds: tuple[float, float] | None = (0.0, 1.0)) -> Summary:
    """95% interval ``mean +- t(0.975, n-1) * std / sqrt(n)``, clipped to ``bounds`` (rates live in [0, 1]).

    With one target the spread is unknown: std 0 and a degenerate interval at the mean.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("nothing to summarise")
    mean = float(x.mean())
    if x.size == 1:
        return Summary(mean, 0.0, mean, mean, 1)
    std = float(x.std(ddof=1))
    half = float(student_t.ppf(0.975, x.size - 1) * std / np.sqrt(x.size))
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(bounds[0], low), min(bounds[1], high)
    return Summary(mean, std, low, high, int(x.size))
