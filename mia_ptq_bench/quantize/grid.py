"""Uniform weight grids: asymmetric, per output channel, range chosen by an L_p shrink search.

A grid for one channel is ``{(q - z) * s : q = 0..L-1}`` with scale ``s`` and integer
zero point ``z``; ``L = 2**b`` levels, or 3 for 1.58 bits. The range starts at the
channel's [min, max] and both ends shrink together by 1% steps (80 candidates);
the candidate with the lowest mean ``|w - q(w)|**p`` (p = 2.4, as the study's
code, after LAPQ) wins. All channels are searched at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_SCALE = 1e-8
STACKED_ELEMENTS = 1 << 22  # weights searched together at most (a search holds a few temporaries this size)


@dataclass(frozen=True)
class Grid:
    scale: torch.Tensor  # (C, 1)
    zero_point: torch.Tensor  # (C, 1), integer-valued
    levels: int

    def integers(self, weight2d: torch.Tensor) -> torch.Tensor:
        """Nearest grid index per weight, in [0, levels - 1]."""
        return torch.clamp(torch.round(weight2d / self.scale) + self.zero_point, 0, self.levels - 1)

    def dequantize(self, integers: torch.Tensor) -> torch.Tensor:
        return (integers - self.zero_point) * self.scale

    def round_to_nearest(self, weight2d: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.integers(weight2d))


def _grid_for_range(low: torch.Tensor, high: torch.Tensor, levels: int) -> Grid:
    scale = ((high - low) / (levels - 1)).clamp_min(MIN_SCALE)
    return Grid(scale, torch.round(-low / scale), levels)


def minmax_grid(weight2d: torch.Tensor, levels: int) -> Grid:
    low = weight2d.min(dim=1, keepdim=True).values
    high = weight2d.max(dim=1, keepdim=True).values
    return _grid_for_range(low, high, levels)


def lp_search_grid(weight2d: torch.Tensor, levels: int, p: float = 2.4, steps: int = 80) -> Grid:
    """Per-row (channel) shrink search of the range minimising the mean L_p rounding error."""
    w = weight2d.detach()
    low = w.min(dim=1, keepdim=True).values
    high = w.max(dim=1, keepdim=True).values
    best = _grid_for_range(low, high, levels)
    best_error = torch.full_like(low, float("inf"))
    for step in range(steps):
        shrink = 1.0 - 0.01 * step
        candidate = _grid_for_range(low * shrink, high * shrink, levels)
        error = (w - candidate.round_to_nearest(w)).abs().pow(p).mean(dim=1, keepdim=True)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = Grid(torch.where(better, candidate.scale, best.scale),
                    torch.where(better, candidate.zero_point, best.zero_point), levels)
    return best


SEARCHES = ("lp", "minmax")  # GridConfig.search lists the same (a test holds them equal)


def _check_search(search: str) -> None:
    if search not in SEARCHES:
        raise ValueError(f"search={search!r}: one of {', '.join(map(repr, SEARCHES))}")


def fit_grid(weight: torch.Tensor, levels: int, *, per_channel: bool = True, search: str = "lp",
             p: float = 2.4, steps: int = 80) -> Grid:
    """A grid for a Conv2d/Linear weight; rows are output channels (or one row per tensor).
    ``search``: "lp" (the range shrunk to minimise the mean ``|w - q(w)|^p``) or "minmax"."""
    _check_search(search)
    rows = weight.detach().flatten(1) if per_channel else weight.detach().reshape(1, -1)
    if search == "minmax":
        return minmax_grid(rows, levels)
    return lp_search_grid(rows, levels, p=p, steps=steps)


def fit_grids(weights: list[torch.Tensor], levels: int, *, per_channel: bool = True, search: str = "lp",
              p: float = 2.4, steps: int = 80) -> list[Grid]:
    """``fit_grid`` for several same-shape weights (one layer of a group of models) in one search.

    Per channel, every row's search is its own, so the rows of all weights are searched together
    (up to ``STACKED_ELEMENTS`` at a time) and the result split: the same grids, with the ~500 small
    tensor operations of an L_p search run once per layer instead of once per model. Each weight is
    searched alone per tensor, for differing shapes or dtypes, and for a single-row weight: torch
    sums one long row in parallel pieces, but a row among others in one piece, so its mean error,
    and possibly its grid, could differ in the last bit.
    """
    _check_search(search)
    alone = (not per_channel or len({(tuple(w.shape), w.dtype) for w in weights}) > 1
             or any(w.shape[0] == 1 for w in weights))
    if alone:
        return [fit_grid(w, levels, per_channel=per_channel, search=search, p=p, steps=steps) for w in weights]
    grids: list[Grid] = []
    chunk = max(1, STACKED_ELEMENTS // max(1, weights[0].numel())) if weights else 1
    for start in range(0, len(weights), chunk):
        part = weights[start : start + chunk]
        stacked = fit_grid(torch.cat([w.detach().flatten(1) for w in part]), levels, search=search, p=p, steps=steps)
        rows = [w.shape[0] for w in part]
        grids += [Grid(scale, zero, levels)
                  for scale, zero in zip(stacked.scale.split(rows), stacked.zero_point.split(rows))]
    return grids


def as_rows(weight: torch.Tensor, grid: Grid) -> torch.Tensor:
    """View a weight with one row per grid row (output channel, or the whole tensor)."""
    return weight.reshape(grid.scale.shape[0], -1)
