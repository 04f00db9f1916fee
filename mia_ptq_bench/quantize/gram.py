"""The Gram matrix ``X X^T`` of a layer's input columns, the heart of a layer Hessian.

For a Linear layer X holds one column per example. For a convolution it is the im2col matrix:
one column per output position, one row per (input channel, kernel row, kernel column). Its
rows for kernel row ``a`` and for kernel row ``a + 1`` read the same input rows, one row apart.
So the Gram matrix's block of two kernel rows is, but for the one or two input rows at the
window's ends, the block of the kernel rows one above: ``conv_gram`` computes one block per
distinct row offset in full and slides it to the others (subtract the input rows leaving the
window, add the ones entering), from a width-only im2col three times smaller than X. For a
3x3 convolution on a large map that is 3 full products of a third of X's rows instead of one of
all of them (measured 1.7-1.9x faster on ResNet10's stride-1 3x3 layers, float64, 2 CPU cores),
and the sums are of the same products, only added in another order, wherever a slide would not
cancel most of a sum (``conv_gram``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# A block is slid only where no column's sum of squares over the window it leaves is more than this
# many times its sum over the window it enters: the subtraction then cancels at most 6 of float64's
# 53 bits, far from float32's rounding, the precision of the sweeps.
SLIDE_LOSS = 64.0


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
    if isinstance(layer, nn.Conv2d) and layer.kernel_size[0] > 1 and layer.groups == 1:
        return conv_gram(layer, inputs, dtype)
    return im2col_gram(layer, inputs, dtype)


def im2col_gram(layer: nn.Module, inputs: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``X @ X.T`` as one product of the whole X, as the reference codes compute it."""
    # Converting the input before the im2col (not the columns after it) saves one large copy.
    x = layer_columns(layer, inputs.to(dtype))
    return x @ x.t()


def conv_gram(layer: nn.Conv2d, inputs: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``X @ X.T`` of a convolution's im2col X, one (kernel row, kernel row) block at a time.

    Kernel row ``a`` reads input row ``stride * i + dilation * a`` for output row ``i``: in the
    input's rows of one phase (their index modulo the stride), a window of ``out_rows``
    consecutive rows starting at ``offset(a)``. Two blocks whose kernel rows have the same phases
    and the same offset difference sum the same row products over windows shifted by some rows;
    the later one is the earlier one minus the rows it leaves plus the rows it enters, wherever
    that is fewer rows than the window and cancels little.

    Cancellation is read off the diagonal blocks, computed first: a column's diagonal entry is its
    sum of squares over its window. A slide is kept only if every column involved keeps at least
    ``1 / SLIDE_LOSS`` of the sum of squares it had over the window slid from, so a slid entry's
    rounding stays within a few float64 ulps of ``sqrt(H_ii H_jj)``, as the plain product's does;
    otherwise the block is computed in full. A column that is zero over its window but not over the
    earlier one fails that test, so its row and column come out exactly zero, as in the plain product.
    """
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    padded = pad_input(layer, inputs)  # the slides below hold for whatever values fill the border
    images, channels, height = padded.shape[:3]
    out_rows = (height - dh * (kh - 1) - 1) // sh + 1
    span = dw * (kw - 1) + 1
    if out_rows < 1 or span > padded.shape[3]:
        raise ValueError(f"a {kh}x{kw} kernel (dilation {dh}x{dw}) does not fit the padded {height}x{padded.shape[3]} input")
    strips = padded.unfold(3, span, sw)  # (N, C, Hp, Wo, kw): the width-only im2col
    if dw > 1:
        strips = strips[..., ::dw]
    features, block = channels * kw, images * strips.shape[3]  # rows (channel, kernel column); columns per input row

    phases: dict[int, torch.Tensor] = {}

    def rows(phase: int) -> torch.Tensor:
        """The phase's input rows as consecutive blocks of columns (image, output column): (features, rows * block)."""
        if phase not in phases:
            view = strips[:, :, phase::sh].permute(1, 4, 2, 0, 3)
            # One copy gathers and converts: the products below then read contiguous rows.
            phases[phase] = torch.empty(view.shape, dtype=dtype, device=view.device).copy_(view).view(features, -1)
        return phases[phase]

    def product(phase_a: int, row_a: int, phase_b: int, row_b: int, count: int) -> torch.Tensor:
        left = rows(phase_a)[:, row_a * block:(row_a + count) * block]
        right = rows(phase_b)[:, row_b * block:(row_b + count) * block]
        return left @ right.t()

    where = [divmod(dh * a, sh)[::-1] for a in range(kh)]  # kernel row -> (phase, offset of its window)
    gram = torch.empty(channels, kh, kw, channels, kh, kw, dtype=dtype, device=inputs.device)
    squares: dict[int, torch.Tensor] = {}  # kernel row -> each column's sum of squares over its window
    latest: dict[tuple[int, int, int], tuple[int, int, int, torch.Tensor]] = {}  # (phases, offset gap) -> block
    pairs = [(a, a) for a in range(kh)] + [(a, b) for a in range(kh) for b in range(a + 1, kh)]  # diagonal first
    for a, b in pairs:  # the blocks below the diagonal are transposes
        (phase_a, start_a), (phase_b, start_b) = where[a], where[b]
        key = (phase_a, phase_b, start_b - start_a)
        part = None
        known = latest.get(key)
        if known is not None and 2 * (start_a - known[0]) < out_rows:
            old, known_a, known_b, earlier = known
            shift = start_a - old
            slid = (earlier - product(phase_a, old, phase_b, old + key[2], shift)
                    + product(phase_a, old + out_rows, phase_b, old + key[2] + out_rows, shift))
            kept = [slid.diagonal()] * 2 if a == b else [squares[a], squares[b]]
            if all((now * SLIDE_LOSS >= squares[before]).all() for now, before in zip(kept, (known_a, known_b))):
                part = slid
        if part is None:
            part = product(phase_a, start_a, phase_b, start_b, out_rows)
        latest[key] = (start_a, a, b, part)
        if a == b:
            squares[a] = part.diagonal()
        part = part.view(channels, kw, channels, kw)
        gram[:, a, :, :, b, :] = part
        if b != a:
            gram[:, b, :, :, a, :] = part.permute(2, 3, 0, 1)
    return gram.view(channels * kh * kw, channels * kh * kw)
