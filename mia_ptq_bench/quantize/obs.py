"""Second-order quantization: the layer Hessian, OBC's ExactOBS greedy sweep, and GPTQ.

Both minimise a layer's output error ``||W X - Q X||^2`` row by row, which for each row
is the quadratic form ``(w - q)^T H (w - q)`` with ``H = 2/N X X^T``. Quantizing one
weight and optimally re-solving the others changes the loss by ``err^2 / [H^-1]_jj``
(optimal brain surgeon); the remaining weights move by ``-err / [H^-1]_jj * H^-1[:, j]``.

- OBC quantizes, in each row, the weight whose quantization costs least, next; every row
  has its own order, so each row carries its own inverse Hessian (rows go in batches).
- GPTQ quantizes the columns in one fixed order for all rows, so one Cholesky factor of
  ``H^-1`` serves every row, and updates are applied lazily in column blocks.
Grids are fixed from the original weights before the sweep.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from ..errors import BenchError
from .gram import input_gram
from .grid import Grid


class NumericalError(BenchError):
    """A layer's Hessian that cannot be inverted in the sweep's precision, even with the fallback damping."""


class HessianAccumulator:
    """H = 2/N sum x x^T over N images, accumulated in float64 (as OBC's reference code scales it)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        columns = layer.weight[0].numel()
        self.hessian = torch.zeros(columns, columns, dtype=torch.float64, device=layer.weight.device)
        self.images = 0

    def add(self, inputs: torch.Tensor) -> None:
        batch = inputs.shape[0]
        gram = input_gram(self.layer, inputs.detach(), torch.float64)
        self.hessian *= self.images / (self.images + batch)
        self.images += batch
        self.hessian += (2.0 / self.images) * gram


@torch.no_grad()
def accumulate_hessians(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """One pass of ``model`` over ``batches`` with a hook on each layer; returns each layer's Hessian."""
    accumulators = {name: HessianAccumulator(layer) for name, layer in layers.items()}
    handles = [layer.register_forward_hook(lambda mod, args, out, acc=accumulators[name]: acc.add(args[0]))
               for name, layer in layers.items()]
    model.eval()
    try:
        for batch in batches:
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: acc.hessian for name, acc in accumulators.items()}


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int) -> torch.Tensor:
    return (torch.clamp(torch.round(w / scale) + zero, 0, levels - 1) - zero) * scale


def _prepare(weight: torch.Tensor, hessian: torch.Tensor, rel_damp: float, dtype: torch.dtype):
    w = weight.detach().flatten(1).to(dtype).clone()
    h = hessian.to(dtype).clone()
    dead = torch.diag(h) == 0  # inputs that are always zero: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    if rel_damp > 0:
        h += rel_damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=dtype, device=h.device)
    return w, h


def inverse_hessian(h: torch.Tensor, fallback_damp: float, *, damped: bool = False) -> torch.Tensor:
    """Cholesky-based inverse; a singular H gets ``fallback_damp * mean(diag(H))`` added, as a last resort.

    An undamped H counts as singular where its factorisation fails or where some column keeps less
    than ``columns * eps`` of its diagonal as its pivot (``numerically_dependent``): an exactly
    singular H (e.g. two inputs that are always equal, or fewer examples than inputs) factors to a
    last pivot that is rounding noise, negative with one CPU's kernels and a few eps positive with
    another's, so LAPACK's own failure alone would decide by the machine. An H the method has ``damped`` already (GPTQ's
    ``rel_damp``) is positive definite by construction: only a failed factorisation sends it to the
    fallback, so a large, nearly duplicated input does not get damped twice.

    Raises NumericalError when H is not finite in this precision (e.g. float32 overflow) or the
    damped factorisation fails too.
    """
    if not torch.isfinite(h).all():
        raise NumericalError(f"the {h.shape[0]}x{h.shape[0]} Hessian is not finite in {h.dtype}")
    factor, info = torch.linalg.cholesky_ex(h)
    if info == 0 and (damped or not numerically_dependent(h, factor)):
        return torch.cholesky_inverse(factor)
    damp = fallback_damp * torch.diag(h).mean()
    factor, info = torch.linalg.cholesky_ex(h + damp * torch.eye(h.shape[0], dtype=h.dtype, device=h.device))
    if info != 0:
        raise NumericalError(f"the {h.shape[0]}x{h.shape[0]} Hessian is not positive definite even with "
                             f"damping {fallback_damp} x its mean diagonal")
    return torch.cholesky_inverse(factor)


def numerically_dependent(h: torch.Tensor, factor: torch.Tensor) -> bool:
    """Whether some column of H is, to ``columns * eps`` of its own diagonal, a combination of the earlier ones.

    A Cholesky pivot ``L_jj^2`` is what is left of ``H_jj`` once the earlier columns explain what they
    can. It is a difference of sums of up to ``columns`` products, each at most ``H_jj`` (Cauchy-Schwarz),
    so its rounding error is of the order of ``columns * eps * H_jj``: a pivot below that cannot be
    told from zero. Relative to each column's own diagonal, so a rarely active input (a small but
    honest diagonal) is not mistaken for a dependent one. ``eps`` is that of H's dtype (the sweep's).
    """
    tolerance = h.shape[0] * torch.finfo(h.dtype).eps
    return bool((torch.diagonal(factor) ** 2 < tolerance * torch.diagonal(h)).any())


# Rows per batch of the OBC sweep are chosen so that the batch's inverse Hessians fit in about this
# many bytes (a typical L3 cache): the downdate streams through them once per step, about twice as
# fast from cache as from memory (measured on a 32 MB-L3 CPU: 83 vs 43 GB/s). Results do not depend on it.
OBC_BATCH_BYTES = 24 * 2**20


def obc_quantize(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, *, parallel: int = 32,
                 rel_damp: float = 0.0, fallback_damp: float = 0.01, dtype: torch.dtype = torch.float32,
                 compact: float = 0.9) -> torch.Tensor:
    """ExactOBS quantization of a layer's weight (rows = output channels); returns Q shaped like ``weight``.

    Per row, repeatedly: round every free weight to its grid; pick the one whose rounding
    raises the loss least (``err^2 / Hinv_jj``) -- or, if some free weight has drifted more
    than half a step off the grid, the one that drifted most; fix it; move the free weights
    optimally; remove it from the row's inverse Hessian (a rank-one downdate).
    """
    return obc_quantize_many([weight], [hessian], [grid], parallel=parallel, rel_damp=rel_damp,
                             fallback_damp=fallback_damp, dtype=dtype, compact=compact)[0]


def obc_quantize_many(weights: list[torch.Tensor], hessians: list[torch.Tensor], grids: list[Grid], *,
                      parallel: int = 32, rel_damp: float = 0.0, fallback_damp: float = 0.01,
                      dtype: torch.dtype = torch.float32, compact: float = 0.9,
                      batch_bytes: int | None = None) -> list[torch.Tensor]:
    """``obc_quantize`` of the same layer in several models (each its own weight, Hessian and grid) at once.

    Every row is swept on its own: all the arithmetic is per row (elementwise, per-row argmin,
    one batched rank-one downdate per row), so a row's result does not depend on which rows
    share its batch. The rows of all models are therefore pooled and swept in batches of
    ``max(parallel, rows fitting in batch_bytes)`` (``OBC_BATCH_BYTES`` by default) rows, each
    row with its own copy of its model's inverse Hessian: small layers go in one batch (the
    per-step Python overhead paid once for all models), large ones in cache-sized batches.

    Every row of a batch fixes one weight per step, so all rows always have the same number
    of free weights. Whenever that number has fallen to ``compact`` times what the working
    arrays hold, they are shrunk to the free columns: the arithmetic on free entries is
    unchanged (bit for bit), but the downdates, the cost of the sweep, get cheaper
    (about 2.7x fewer operations at 0.9). ``compact=1.0`` never shrinks them.
    """
    prepared = [_prepare(w, h, rel_damp, dtype) for w, h in zip(weights, hessians)]
    hinvs = torch.stack([inverse_hessian(h, fallback_damp, damped=rel_damp > 0) for _, h in prepared])
    levels = {g.levels for g in grids}
    if len(levels) != 1:
        raise ValueError(f"one layer, one number of levels: got {sorted(levels)}")
    (level_count,) = levels
    w_all = torch.cat([w for w, _ in prepared])
    owner = torch.cat([torch.full((w.shape[0],), m, dtype=torch.long, device=w.device) for m, (w, _) in
                       enumerate(prepared)])
    scale_all = torch.cat([g.scale.to(dtype).expand(w.shape[0], 1) for g, (w, _) in zip(grids, prepared)])
    zero_all = torch.cat([g.zero_point.to(dtype).expand(w.shape[0], 1) for g, (w, _) in zip(grids, prepared)])
    rows, columns = w_all.shape
    row_bytes = columns * columns * hinvs.element_size()
    per_batch = max(parallel, (OBC_BATCH_BYTES if batch_bytes is None else batch_bytes) // row_bytes)
    q_all = torch.zeros_like(w_all)
    for r1 in range(0, rows, per_batch):
        r2 = min(r1 + per_batch, rows)
        _obc_rows(w_all[r1:r2].clone(), hinvs[owner[r1:r2]], scale_all[r1:r2], zero_all[r1:r2], level_count,
                  compact, q_all[r1:r2])
    out, start = [], 0
    for weight in weights:
        out.append(q_all[start:start + weight.shape[0]].to(weight.dtype).view_as(weight))
        start += weight.shape[0]
    return out


def _obc_rows(w: torch.Tensor, hinv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int,
              compact: float, q_out: torch.Tensor) -> None:
    """Sweep a batch of rows ``w`` (count, K), each with its own inverse Hessian ``hinv`` (count, K, K); write Q into ``q_out``."""
    count, columns = w.shape
    fixed = torch.zeros_like(w, dtype=torch.bool)
    cols = torch.arange(columns, device=w.device).expand(count, columns)  # working position -> column
    index = torch.arange(count, device=w.device)
    outlier = 0.25 * scale.square()
    for step in range(columns):
        free = columns - step
        if free < compact * w.shape[1]:
            keep = (~fixed).nonzero()[:, 1].view(count, free)  # ascending: tie-breaks stay the same
            w, cols = w.gather(1, keep), cols.gather(1, keep)
            hinv = hinv.gather(1, keep.unsqueeze(2).expand(count, free, hinv.shape[2]))
            hinv = hinv.gather(2, keep.unsqueeze(1).expand(count, free, free))
            fixed = torch.zeros_like(w, dtype=torch.bool)
        q = round_to_grid(w, scale, zero, levels)
        err = (w - q).square()
        diag = torch.diagonal(hinv, dim1=1, dim2=2)
        scores = (err / diag).masked_fill(fixed, float("inf"))
        err = err.masked_fill(fixed, 0)
        j = scores.argmin(1)
        drifted = (err > outlier).any(1) & (w[index, j] != 0)
        j = torch.where(drifted, err.argmax(1), j)
        q_j = q[index, j]
        q_out[index, cols[index, j]] = q_j
        row = hinv[index, j, :]
        d = diag[index, j]
        w -= row * ((w[index, j] - q_j) / d).unsqueeze(1)
        fixed[index, j] = True
        if step == columns - 1:
            break
        row = row / torch.sqrt(d).unsqueeze(1)
        # In place: the same products and differences as ``hinv -= bmm(row, row^T)`` (checked bit for bit
        # by the tests), without a (count, K, K) temporary per step -- allocating and page-faulting that
        # temporary made the sweep 6-14x slower on a CPU.
        hinv.baddbmm_(row.unsqueeze(2), row.unsqueeze(1), alpha=-1)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, *, block_size: int = 128,
                  rel_damp: float = 0.01, act_order: bool = False, fallback_damp: float = 0.1,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GPTQ: columns in a fixed order (or by decreasing Hessian diagonal), lazy block updates."""
    return gptq_quantize_many([weight], [hessian], [grid], block_size=block_size, rel_damp=rel_damp,
                              act_order=act_order, fallback_damp=fallback_damp, dtype=dtype)[0]


# Models swept together by GPTQ are chosen so that their stacked inverse-Hessian factors take at most
# about this many bytes (at least one model): small layers, where the per-column overhead is the cost,
# go all at once; a large layer (ResNet18's last convolution: 81 MiB per model in float32) a few models
# at a time. Results do not depend on it.
GPTQ_BATCH_BYTES = 256 * 2**20


def gptq_quantize_many(weights: list[torch.Tensor], hessians: list[torch.Tensor], grids: list[Grid], *,
                       block_size: int = 128, rel_damp: float = 0.01, act_order: bool = False,
                       fallback_damp: float = 0.1, dtype: torch.dtype = torch.float32,
                       batch_bytes: int | None = None) -> list[torch.Tensor]:
    """``gptq_quantize`` of the same layer in several models (same shape; each its own weight, Hessian and grid) at once.

    The column loop runs once for a batch of models (as many as fit in ``batch_bytes``,
    ``GPTQ_BATCH_BYTES`` by default): each step's arithmetic is elementwise on a (models, rows)
    array, the same operations on the same numbers as a model alone gets, so the per-column
    overhead (a dozen small operations, the sweep's cost on small layers) is paid once. The lazy
    update at a block's end stays one product per model, the very product a model alone computes,
    so the result is each model's own.
    """
    if len({tuple(w.shape) for w in weights}) != 1 or len({g.levels for g in grids}) != 1:
        raise ValueError("one layer: the same weight shape and number of levels in every model")
    columns = weights[0][0].numel()
    per_model = columns * columns * torch.empty((), dtype=dtype).element_size()
    step = max(1, (GPTQ_BATCH_BYTES if batch_bytes is None else batch_bytes) // per_model)
    out = []
    for first in range(0, len(weights), step):
        last = first + step
        out += _gptq_sweep(weights[first:last], hessians[first:last], grids[first:last], block_size, rel_damp,
                           act_order, fallback_damp, dtype)
    return out


def _gptq_sweep(weights, hessians, grids, block_size, rel_damp, act_order, fallback_damp, dtype) -> list[torch.Tensor]:
    rows, columns = weights[0].shape[0], weights[0][0].numel()
    device = weights[0].device
    w = torch.empty(len(weights), rows, columns, dtype=dtype, device=device)
    # Upper Cholesky factors of H^-1: row i holds the update coefficients once columns < i are fixed.
    hinv = torch.empty(len(weights), columns, columns, dtype=dtype, device=device)
    orders = []
    for m, (weight, hessian) in enumerate(zip(weights, hessians)):  # one model's temporaries at a time
        prepared, h = _prepare(weight, hessian, rel_damp, dtype)
        order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(columns, device=device)
        w[m] = prepared[:, order]
        factor, info = torch.linalg.cholesky_ex(inverse_hessian(h[order][:, order], fallback_damp, damped=rel_damp > 0),
                                                upper=True)
        if info != 0:  # H^-1 rounded to indefinite: H's condition is beyond the sweep's precision
            raise NumericalError(f"the inverse of the {columns}x{columns} Hessian is not positive definite in {dtype}")
        hinv[m] = factor
        orders.append(order)
        del prepared, h
    scale = torch.stack([g.scale.to(dtype)[:, 0] for g in grids])  # (models, rows)
    zero = torch.stack([g.zero_point.to(dtype)[:, 0] for g in grids])
    levels = grids[0].levels
    q = torch.zeros_like(w)
    for c1 in range(0, columns, block_size):
        c2 = min(c1 + block_size, columns)
        block = w[:, :, c1:c2].clone()
        errors = torch.zeros_like(block)
        hblock = hinv[:, c1:c2, c1:c2]
        for i in range(c2 - c1):
            column = block[:, :, i]
            quantized = round_to_grid(column, scale, zero, levels)
            q[:, :, c1 + i] = quantized
            err = (column - quantized) / hblock[:, i, i].unsqueeze(1)
            block[:, :, i:] -= err.unsqueeze(2) * hblock[:, i, i:].unsqueeze(1)
            errors[:, :, i] = err
        if c2 < columns:
            for m in range(len(weights)):
                w[m, :, c2:] -= errors[m] @ hinv[m, c1:c2, c2:]
    return [q[m][:, torch.argsort(order)].to(weight.dtype).view_as(weight)
            for m, (weight, order) in enumerate(zip(weights, orders))]
