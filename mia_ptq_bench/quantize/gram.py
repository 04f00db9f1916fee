"""The Gram matrix ``X X^T`` of a layer's input columns, the heart of a layer Hessian.

For a Linear layer X holds one column per example. For a convolution it is the im2col matrix:
one column per output position, one row per (input channel, kernel row, kernel column), and
the Gram matrix has one (C, C) block per pair of kernel positions. Every entry of the block of
kernel positions p and p' is a sum, over images and output positions, of the product of an input
pixel and the pixel displaced from it by p' - p. A 3x3 kernel has 81 such blocks but only 13
distinct displacements (up to transposition), so ``conv_gram`` computes the channel-by-channel
products summed over images at every input position, for every displacement, and then each block
as the sum of those over its own window of positions (a product with a 0/1 window matrix). The
displacements of one row distance are taken together, as one batched product of each pixel with
its row of neighbours: C x wC products, where C x C ones would run far below the CPU's peak. A
strided layer is split into its row phases, and the column phases a stride reads sit side by
side in each product. The sums are of the same products as the plain ``X X^T``, in another
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
    # A 1x1 convolution multiplies its input, subsampled by the stride, itself: X has no repeated
    # pixels to share, and one product of it is as fast (AMD EPYC, ResNet10's strided shortcuts).
    if isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.kernel_size != (1, 1):
        return conv_gram(layer, inputs, dtype)
    return im2col_gram(layer, inputs, dtype)


def im2col_gram(layer: nn.Module, inputs: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``X @ X.T`` as one product of the whole X, as the reference codes compute it."""
    # Converting the input before the im2col (not the columns after it) saves one large copy.
    x = layer_columns(layer, inputs.to(dtype))
    return x @ x.t()


def conv_gram(layer: nn.Conv2d, inputs: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``X @ X.T`` of a convolution's im2col X, from the products of input pixels at each displacement.

    Output position (i, j) of kernel position (a, b) reads input row ``stride * i + dilation * a - pad``.
    Split the input rows by their index modulo the stride (the phase): then that row is row
    ``i + first(a)`` of phase ``phase(a)``, so blocks (a, a') read two phases at a fixed distance
    ``first(a') - first(a)``, whatever i. Columns stay whole: the pixels a kernel column reads lie a
    stride apart, and a block's right pixel sits a fixed number of columns from its left one.
    ``_Plan`` groups the kernel-position pairs into bands, one per (left phase, right phase, row
    distance). Per band one batched product gives, at every tile of left pixels (the column phases
    read, side by side), the products summed over images with each pixel of the row of right
    neighbours the band's pairs reach; a 0/1 matrix of each pair's window (the output positions where
    both pixels lie inside the input; outside is zero padding) then sums its own block over positions.
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
    # Each row phase as (images, pixels, channels), its rows of ``wide`` columns (the width rounded up
    # to whole strides) one after another between zero margins that every band's reads stay within: a
    # C x I matrix at every left pixel and an I x wC one at every band start, plain strided views for
    # the batched product, and the left pixels of one column phase a fixed stride apart.
    rows, columns = plan.grid
    wide = columns * sw
    span = plan.front + rows * wide + plan.back
    phases = {}
    for phase in plan.phases:
        part = source[:, :, phase::sh].permute(0, 2, 3, 1)
        buffer = torch.empty(images, span, channels, dtype=dtype, device=inputs.device)
        buffer[:, :plan.front].zero_()
        buffer[:, plan.front + rows * wide:].zero_()
        grid = buffer[:, plan.front:plan.front + rows * wide].view(images, rows, wide, channels)
        if part.shape[1:3] != (rows, wide):
            grid.zero_()
        grid[:, :part.shape[1], :part.shape[2]].copy_(part)
        phases[phase] = buffer
    positions = rows * columns
    tile, origin = plan.tile * channels, plan.front + plan.first  # the first tile's first pixel
    pairs, sums = [], []
    for band in plan.bands:
        lefts = phases[band.left].as_strided((positions, tile, images), (sw * channels, 1, span * channels),
                                             origin * channels)
        rights = phases[band.right].as_strided((positions, images, band.width * channels),
                                               (sw * channels, span * channels, 1), (origin + band.shift) * channels)
        windows, where, kept = band.on(dtype, inputs.device)
        chunk = max(1, PRODUCT_BYTES // (tile * band.width * channels * dtype.itemsize))
        total = None
        for first in range(band.start, band.stop, chunk):
            last = min(first + chunk, band.stop)
            products = torch.bmm(lefts[first:last], rights[first:last])
            part = windows[:, first - band.start:last - band.start] @ products.view(last - first, -1)
            total = part if total is None else total.add_(part)
        # Each pair keeps its own window's sums of its left pixel of the tile and right pixel of the band:
        # one C x C block.
        total = total.view(-1, plan.tile, channels, band.width, channels)
        pairs.append(kept)
        sums.append(total[where[:, 0], where[:, 1], :, where[:, 2]])
    blocks = torch.zeros(kh * kw, kh * kw, channels, channels, dtype=dtype, device=inputs.device)
    if pairs:  # none where every pixel the kernel reads is padding
        pairs, sums = torch.cat(pairs), torch.cat(sums)
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
class _Band:
    """Kernel-position pairs of two row phases one phase row apart: one batched product, of each tile
    of left pixels (one per column phase read, side by side) with the ``width`` pixels of its row of
    right neighbours."""

    left: int  # row phases
    right: int
    shift: int  # from a tile's first pixel to its first right neighbour, in pixels of the flattened row phase
    width: int
    pairs: torch.Tensor  # (pairs, 2) kernel positions, row-major
    places: torch.Tensor  # (pairs, 3) each pair's window, left pixel in the tile and right pixel among the neighbours
    start: int  # the tiles some pair's window holds, on the phase grid: no product is taken outside them
    stop: int
    windows: torch.Tensor  # (windows, stop - start) bool: the tiles a pair sums over, each window once
    converted: dict = field(default_factory=dict, compare=False, repr=False)

    def on(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The windows in ``dtype``, the places and the pairs, on ``device``: converted once per plan."""
        key = (dtype, torch.device(device))
        if key not in self.converted:
            self.converted[key] = (self.windows.to(device=device, dtype=dtype), self.places.to(device),
                                   self.pairs.to(device))
        return self.converted[key]


@dataclass(frozen=True)
class _Plan:
    grid: tuple[int, int]  # rows and columns of a phase grid
    first: int  # the first column phase read: a tile's first pixel
    tile: int  # pixels per tile, from the first column phase read to the last
    front: int  # zero margins of the flattened row phases, for the bands' reads
    back: int
    phases: tuple[int, ...]  # the row phases read
    bands: tuple[_Band, ...]


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


# A plan holds its windows (one byte per distinct window and position, and a copy per dtype and device used):
# a few MB for a 3x3 kernel on a 224x224 map, far less on this benchmark's small images.
@functools.lru_cache(maxsize=32)
def _plan(kernel, stride, dilation, pad, size, padded) -> _Plan:
    rows, row_outputs, grid_rows = _axis(kernel[0], stride[0], dilation[0], pad[0], size[0], padded[0])
    cols, col_outputs, grid_cols = _axis(kernel[1], stride[1], dilation[1], pad[1], size[1], padded[1])
    real_rows = [len(range(p, size[0], stride[0])) for p in range(stride[0])]
    real_cols = [len(range(p, size[1], stride[1])) for p in range(stride[1])]
    positions = [(a, b) for a in range(kernel[0]) for b in range(kernel[1])]
    banded: dict[tuple, list] = {}
    for p, (a, b) in enumerate(positions):
        for q, (c, d) in enumerate(positions):
            (ra, fa), (rc, fc) = rows[a], rows[c]
            (cb, gb), (cd, gd) = cols[b], cols[d]
            i = _window(fa, fc, row_outputs, real_rows[ra], real_rows[rc])
            j = _window(gb, gd, col_outputs, real_cols[cb], real_cols[cd])
            if not i or not j:
                continue  # every product of the pair falls in the zero padding
            rise, step = fc - fa, (gd * stride[1] + cd) - (gb * stride[1] + cb)  # phase rows, input columns
            if (rise, step, q) < (0, 0, p):
                continue  # the transpose of a pair kept
            # The window's left pixels, flattened on the left phase's grid.
            where = ((torch.arange(i.start, i.stop) + fa)[:, None] * grid_cols
                     + (torch.arange(j.start, j.stop) + gb)[None, :]).flatten()
            banded.setdefault((ra, rc, rise), []).append(((p, q), cb, step, where))
    read = {cb for members in banded.values() for _, cb, _, _ in members}  # the column phases read
    first = min(read, default=0)
    tile = max(read, default=0) - first + 1
    bands = []
    for (left, right, rise), members in banded.items():
        # A right pixel's place from the tile's first pixel: its left pixel's, plus the step.
        reach = [cb - first + step for _, cb, step, _ in members]
        low, width = min(reach), max(reach) - min(reach) + 1
        start = min(int(where[0]) for _, _, _, where in members)
        stop = max(int(where[-1]) for _, _, _, where in members) + 1
        windows = torch.zeros(len(members), stop - start, dtype=torch.bool)
        for row, (_, _, _, where) in enumerate(members):
            windows[row, where - start] = True
        # Pairs share windows (a padded 3x3 kernel's 45 pairs have 22 in its 3 bands at stride 1, 16 in 6 at
        # stride 2): each window's sums are taken once.
        windows, window = torch.unique(windows, dim=0, return_inverse=True)
        places = [[int(w), cb - first, r - low] for w, (_, cb, _, _), r in zip(window, members, reach)]
        bands.append(_Band(left, right, rise * grid_cols * stride[1] + low, width,
                           torch.tensor([pair for pair, _, _, _ in members]), torch.tensor(places),
                           start, stop, windows))
    # A row phase holds grid_rows * grid_cols * stride pixels; tile k starts at pixel stride * k + first
    # and reads pixels shift + [0, width) from there.
    phases = tuple(sorted({b.left for b in bands} | {b.right for b in bands}))
    front = max([0] + [-(first + band.shift) for band in bands])
    back = max([0] + [first + band.shift + band.width - stride[1] for band in bands])
    return _Plan((grid_rows, grid_cols), first, tile, front, back, phases, tuple(bands))
