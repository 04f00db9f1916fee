"""The Gram matrix ``X X^T`` of a layer's input columns, the heart of a layer Hessian.

For a Linear layer X holds one column per example. For a convolution it is the im2col matrix:
one column per output position, one row per (input channel, kernel row, kernel column), and
the Gram matrix has one (C, C) block per pair of kernel positions. Every entry of the block of
kernel positions p and p' is a sum, over images and output positions, of the product of an input
pixel and the pixel displaced from it by p' - p. A 3x3 kernel has 81 such blocks but only 13
distinct displacements (up to transposition), so ``conv_gram`` computes, per displacement, the
channel-by-channel products summed over images at every input position (one batched product
over positions), and then each block as the sum of that over its own window of positions (one
more product, with a 0/1 window matrix). A strided layer is split into its stride phases first,
where the same holds. The sums are of the same products as the plain ``X X^T``, in another
order, with no subtraction anywhere: exact on integer inputs, and an input column that is zero
over its window gives an exactly zero row and column. Zero padding is never materialised.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# Bytes of one batched product's (positions, C, C) result: on a large map it would otherwise hold
# a C x C matrix for every input pixel, so the positions go in chunks of at most this size.
PRODUCT_BYTES = 64 << 20


def layer_columns(layer: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The layer's input as columns (K, n): one per example for Linear, one per output position (im2col) for Conv2d.

    For a convolution the columns are gathered straight from the (padded) input in one copy
    into a contiguous (K, n) array: the same values in the same layout as ``F.unfold``
    followed by a permute, which would copy the (large) column array twice. The input is padded
    as the layer's own forward pads it (``pad_input``), so ``W @ X`` is its output without bias.
    """
    if isinstance(layer, nn.Linear):
        return inputs.reshape(-1, inputs.shape[-1]).t()
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    padded = pad_input(layer, inputs)
    patches = padded.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)  # (N, C, Ho, Wo, span, span)
    if dh > 1 or dw > 1:
        patches = patches[..., ::dh, ::dw]
    # K ordered (channel, kernel row, kernel column) and columns (image, row, column), as F.unfold.
    return patches.permute(1, 4, 5, 0, 2, 3).reshape(patches.shape[1] * kh * kw, -1)


def pad_input(layer: nn.Conv2d, inputs: torch.Tensor) -> torch.Tensor:
    """``inputs`` padded as ``layer`` pads them: any ``padding_mode``, and 'same' (which may pad one side more) or 'valid'."""
    # The (left, right, top, bottom) amounts Conv2d itself hands F.pad, whatever form its padding was given in.
    amounts = tuple(layer._reversed_padding_repeated_twice)
    if not any(amounts):
        return inputs
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return F.pad(inputs, amounts, mode=mode)


def input_gram(layer: nn.Module, inputs: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``X @ X.T`` for X = ``layer_columns(layer, inputs)``, computed in ``dtype``."""
    # A 1x1 convolution of stride 1 multiplies the input itself: one product of it is as fast.
    if isinstance(layer, nn.Conv2d) and layer.groups == 1 and (layer.kernel_size, layer.stride) != ((1, 1), (1, 1)):
        return conv_gram(layer, inputs, dtype)
    return im2col_gram(layer, inputs, dtype)


def im2col_gram(layer: nn.Module, inputs: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``X @ X.T`` as one product of the whole X, as the reference codes compute it."""
    # Converting the input before the im2col (not the columns after it) saves one large copy.
    x = layer_columns(layer, inputs.to(dtype))
    return x @ x.t()


def conv_gram(layer: nn.Conv2d, inputs: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``X @ X.T`` of a convolution's im2col X, from the products of input pixels at each displacement.

    Output position (i, j) of kernel position (a, b) reads input row ``stride * i + dilation * a - pad``
    (and likewise for columns). Split the input rows by their index modulo the stride (the phase):
    then that row is row ``i + first(a)`` of phase ``phase(a)``, so blocks (a, a') read two phases
    at a fixed distance ``first(a') - first(a)``, whatever i. ``_Plan`` groups the kernel-position
    pairs by (left phase, right phase, distance); per group one batched product gives, at every
    left position, the C x C products summed over images, and a 0/1 matrix of each pair's window
    (the output positions where both pixels lie inside the input; outside is zero padding) sums them.
    """
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    if layer.padding_mode == "zeros":
        source = inputs  # the zero border is left out of every window instead of stored
        left, right, top, bottom = layer._reversed_padding_repeated_twice
    else:
        source, left, right, top, bottom = pad_input(layer, inputs), 0, 0, 0, 0
    images, channels, height, width = source.shape
    padded_height, padded_width = height + top + bottom, width + left + right
    if dh * (kh - 1) + 1 > padded_height or dw * (kw - 1) + 1 > padded_width:
        raise ValueError(f"a {kh}x{kw} kernel (dilation {dh}x{dw}) does not fit the padded "
                         f"{padded_height}x{padded_width} input")
    plan = _plan((kh, kw), (sh, sw), (dh, dw), (top, left), (height, width), (padded_height, padded_width))
    # Each phase as (positions, images, channels), positions row by row on a common phase grid: one
    # copy gathers and converts, and a displacement is then an offset along the first axis.
    phases = {}
    for phase in plan.phases:
        part = source[:, :, phase[0]::sh, phase[1]::sw].permute(2, 3, 0, 1)
        grid = torch.empty(plan.grid + (images, channels), dtype=dtype, device=inputs.device)
        if part.shape[:2] != plan.grid:
            grid.zero_()
        grid[:part.shape[0], :part.shape[1]].copy_(part)
        phases[phase] = grid.view(-1, images, channels)
    chunk = max(1, PRODUCT_BYTES // (channels * channels * dtype.itemsize))
    pairs, sums = [], []
    for group in plan.groups:
        left_phase, right_phase = phases[group.left], phases[group.right]
        windows = group.windows_as(dtype, inputs.device)
        total = None
        for start in range(0, group.length, chunk):
            stop = min(start + chunk, group.length)
            products = torch.bmm(left_phase[start:stop].transpose(1, 2), right_phase[start + group.offset:stop + group.offset])
            part = windows[:, start:stop] @ products.view(stop - start, -1)
            total = part if total is None else total.add_(part)
        pairs.append(group.pairs)
        sums.append(total)
    blocks = torch.zeros(kh * kw, kh * kw, channels, channels, dtype=dtype, device=inputs.device)
    if pairs:  # none where every pixel the kernel reads is padding
        pairs, sums = torch.cat(pairs).to(inputs.device), torch.cat(sums).view(-1, channels, channels)
        blocks[pairs[:, 1], pairs[:, 0]] = sums.transpose(1, 2)
        blocks[pairs[:, 0], pairs[:, 1]] = sums  # on the diagonal, this one counts
    result = blocks.permute(2, 0, 3, 1).reshape(channels * kh * kw, channels * kh * kw)
    if not torch.isfinite(result).all():
        # The window sums multiply every position's products, in a window or not, by 0 or 1, and 0
        # times an infinite product is NaN: a pixel the layer never reads (a row a stride skips) could
        # spoil entries that do not contain it. The one product gives each entry only its own terms.
        return im2col_gram(layer, inputs, dtype)
    return result


@dataclass(frozen=True)
class _Group:
    """Kernel-position pairs whose pixels are one phase grid offset apart: one batched product."""

    left: tuple[int, int]
    right: tuple[int, int]
    offset: int  # along the flattened phase grid, >= 0
    length: int  # left positions whose right partner lies on the grid
    pairs: torch.Tensor  # (pairs, 2) kernel positions, row-major
    windows: torch.Tensor  # (pairs, length) bool: the left positions each pair sums over
    converted: dict = field(default_factory=dict, compare=False, repr=False)

    def windows_as(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (dtype, torch.device(device))
        if key not in self.converted:
            self.converted[key] = self.windows.to(device=device, dtype=dtype)
        return self.converted[key]


@dataclass(frozen=True)
class _Plan:
    grid: tuple[int, int]
    phases: tuple[tuple[int, int], ...]
    groups: tuple[_Group, ...]


def _axis(kernel: int, stride: int, dilation: int, pad: int, size: int, padded: int):
    """Per kernel index: (phase, first row of its window on the phase), the output count, and the phase grid's length."""
    outputs = (padded - dilation * (kernel - 1) - 1) // stride + 1
    places = []
    for k in range(kernel):
        phase = (dilation * k - pad) % stride
        places.append((phase, (dilation * k - pad - phase) // stride))
    return places, outputs, -(-size // stride)


def _window(first: int, other: int, outputs: int, real: int, real_other: int) -> range:
    """Output indices whose two pixels (rows ``i + first`` and ``i + other`` of their phases) both exist."""
    low = max(0, -first, -other)
    high = min(outputs, real - first, real_other - other)
    return range(low, max(low, high))


# A plan holds its windows (one byte per pair and position, and a copy per dtype and device used):
# a few MB for a 3x3 kernel on a 224x224 map, far less on this benchmark's small images.
@functools.lru_cache(maxsize=32)
def _plan(kernel, stride, dilation, pad, size, padded) -> _Plan:
    rows, row_outputs, grid_rows = _axis(kernel[0], stride[0], dilation[0], pad[0], size[0], padded[0])
    cols, col_outputs, grid_cols = _axis(kernel[1], stride[1], dilation[1], pad[1], size[1], padded[1])
    real_rows = [len(range(p, size[0], stride[0])) for p in range(stride[0])]
    real_cols = [len(range(p, size[1], stride[1])) for p in range(stride[1])]
    positions = [(a, b) for a in range(kernel[0]) for b in range(kernel[1])]
    grouped: dict[tuple, list] = {}
    for p, (a, b) in enumerate(positions):
        for q, (c, d) in enumerate(positions):
            (ra, fa), (rc, fc) = rows[a], rows[c]
            (cb, gb), (cd, gd) = cols[b], cols[d]
            i = _window(fa, fc, row_outputs, real_rows[ra], real_rows[rc])
            j = _window(gb, gd, col_outputs, real_cols[cb], real_cols[cd])
            if not i or not j:
                continue  # every product of the pair falls in the zero padding
            offset = (fc - fa) * grid_cols + (gd - gb)
            if offset < 0 or (offset == 0 and q < p):
                continue  # the transpose of a pair kept
            # The window's left pixels, flattened on the left phase's grid.
            where = ((torch.arange(i.start, i.stop) + fa)[:, None] * grid_cols
                     + (torch.arange(j.start, j.stop) + gb)[None, :]).flatten()
            grouped.setdefault(((ra, cb), (rc, cd), offset), []).append(((p, q), where))
    groups = []
    for (left, right, offset), members in grouped.items():
        length = grid_rows * grid_cols - offset
        windows = torch.zeros(len(members), length, dtype=torch.bool)
        for row, (_, where) in enumerate(members):
            windows[row, where] = True
        groups.append(_Group(left, right, offset, length, torch.tensor([pair for pair, _ in members]), windows))
    phases = tuple(sorted({g.left for g in groups} | {g.right for g in groups}))
    return _Plan((grid_rows, grid_cols), phases, tuple(groups))
