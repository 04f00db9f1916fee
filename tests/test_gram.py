"""The layer Gram matrix X X^T: the per-displacement convolution products against the plain im2col product."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

from mia_ptq_bench.quantize import gram
from mia_ptq_bench.quantize.gram import conv_gram, input_gram, layer_columns
from mia_ptq_bench.quantize.obs import HessianAccumulator

# Kernel (rows, columns), padding and input height: maps smaller than some windows and tall ones,
# odd sizes; with every stride phase below.
SHAPES = list(itertools.product([(2, 1), (3, 3), (5, 2)], [0, 1, 2], [3, 8, 17]))


def _reference(conv: nn.Conv2d, inputs: torch.Tensor) -> torch.Tensor:
    columns = layer_columns(conv, inputs.double())
    return columns @ columns.t()


def _integer_inputs(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    # Small integers: every product and every partial sum is an integer far below 2**53, so any
    # order of the additions gives the same float64 result and the comparison can be exact.
    return torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("dilation", [1, 2])
def test_conv_gram_equals_the_im2col_product_exactly_on_integer_inputs(stride: int, dilation: int) -> None:
    checked = 0
    for kernel, padding, height in SHAPES:
        if dilation * (kernel[0] - 1) + 1 > height + 2 * padding:
            continue
        conv = nn.Conv2d(2, 3, kernel, stride=stride, dilation=dilation, padding=padding)
        inputs = _integer_inputs(height, (3, 2, height, 9))
        assert torch.equal(conv_gram(conv, inputs), _reference(conv, inputs)), (kernel, padding, height)
        checked += 1
    assert checked >= 20


def test_one_batched_product_per_row_distance_and_agreement_to_rounding_on_real_valued_inputs() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    inputs = torch.randn(5, 3, 20, 20, generator=torch.Generator().manual_seed(0)).relu()
    calls = []
    with pytest.MonkeyPatch.context() as patch:  # record the batched products' shapes
        patch.setattr(torch, "bmm", lambda a, b: calls.append((a.shape, b.shape)) or torch.matmul(a, b))
        result = conv_gram(conv, inputs)
    # 81 blocks, but only 13 displacements up to transposition: (0, 0..2), (1, -2..2), (2, -2..2),
    # one product per row distance, of each left pixel (3 channels) with its row of right neighbours,
    # over the left pixels whose partner one or two rows down exists: 20, 19 and 18 rows of 20.
    assert calls == [((400, 3, 5), (400, 5, 3 * 3)), ((380, 3, 5), (380, 5, 5 * 3)), ((360, 3, 5), (360, 5, 5 * 3))]
    reference = _reference(conv, inputs)
    assert torch.allclose(result, reference, rtol=1e-12, atol=1e-12 * reference.abs().max().item())


def test_a_strided_convolution_is_split_into_its_phases() -> None:
    # Stride 2: kernel rows 0 and 2 read odd input rows (with the padding), rows -1 and 0 of phase 1,
    # row 1 even ones, row 0 of phase 0. Each (left phase, right phase, row distance) band is one
    # product of two-pixel tiles (both column phases) with their right neighbours: six of them, (1, 1, 0),
    # (1, 1, 1), (1, 0, 1), (1, 0, 0), (0, 0, 0) and (0, 1, 0), where there are 45 blocks up to transposition.
    conv = nn.Conv2d(2, 2, 3, stride=2, padding=1)
    inputs = _integer_inputs(3, (3, 2, 12, 12))
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "bmm", lambda a, b: calls.append(1) or torch.matmul(a, b))
        result = conv_gram(conv, inputs)
    assert torch.equal(result, _reference(conv, inputs))
    assert len(calls) == 6


def test_large_maps_go_in_chunks_of_positions_with_the_same_result(monkeypatch) -> None:
    conv = nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=1)
    inputs = _integer_inputs(4, (2, 2, 15, 11))
    whole = conv_gram(conv, inputs)
    monkeypatch.setattr(gram, "PRODUCT_BYTES", 7 * 2 * 2 * 8)  # 7 positions per product
    assert torch.equal(conv_gram(conv, inputs), whole)
    assert torch.equal(whole, _reference(conv, inputs))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_strided_layers_with_a_non_zero_border_are_exact(mode: str) -> None:
    for stride, padding, kernel in [((2, 3), (1, 2), (3, 3)), ((3, 2), (2, 1), (2, 4)), ((2, 2), (1, 1), (3, 1))]:
        conv = nn.Conv2d(2, 2, kernel, stride=stride, padding=padding, padding_mode=mode)
        inputs = _integer_inputs(sum(stride), (2, 2, 11, 10))
        assert torch.equal(conv_gram(conv, inputs), _reference(conv, inputs)), (mode, stride, padding, kernel)


def test_an_infinite_pixel_the_layer_never_reads_leaves_the_gram_finite() -> None:
    # Stride 2 over 6 rows and columns without padding reads rows and columns 0-4 only: the one
    # im2col product never meets the last pixel; the per-displacement products do (at a position
    # no window counts) and would turn 0 x inf into NaN.
    conv = nn.Conv2d(1, 1, 3, stride=2)
    inputs = torch.ones(2, 1, 6, 6)
    inputs[0, 0, 5, 5] = float("inf")
    result = conv_gram(conv, inputs)
    assert torch.isfinite(result).all() and torch.equal(result, _reference(conv, inputs))
    inputs[0, 0, 2, 2] = float("nan")  # one the layer reads: its entries are NaN, as in the one product
    assert torch.equal(conv_gram(conv, inputs).isnan(), _reference(conv, inputs).isnan())


def test_a_kernel_that_reads_only_padding_gives_a_zero_gram() -> None:
    conv = nn.Conv2d(2, 1, 2, stride=5, padding=2)  # its only output reads padded rows and columns 0-1
    assert torch.equal(conv_gram(conv, torch.ones(3, 2, 1, 1)), torch.zeros(8, 8, dtype=torch.float64))


def _rounding_noise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A product whose nonzero entries are off by a relative 1e-15 either way: another BLAS's grouping
    of the additions. Exact zeros stay exact, as in any BLAS: their sums are of exact zero products."""
    result = torch.matmul(a, b)
    sign = torch.randint(0, 2, result.shape, generator=torch.Generator().manual_seed(result.numel())) * 2 - 1
    return result * (1 + 1e-15 * sign)


def test_a_column_that_is_zero_over_its_window_keeps_an_exactly_zero_row_and_column() -> None:
    # Channel 0 lives only in the top input row: kernel row 2 never sees it (its window starts one
    # row lower), so its entries must be exactly zero however the products round (a sum obtained by
    # subtracting the rows a window leaves from a larger sum would leave two roundings' difference).
    conv = nn.Conv2d(2, 2, 3, padding=1)
    inputs = torch.randn(4, 2, 12, 12, generator=torch.Generator().manual_seed(1)) * 1.37
    inputs[:, 0, 1:] = 0
    reference = _reference(conv, inputs)
    dead = reference.diagonal() == 0
    assert dead.sum() == 3  # channel 0's kernel row 2, all three kernel columns
    for arithmetic in (lambda a, b: torch.matmul(a, b), _rounding_noise):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.Tensor, "__matmul__", arithmetic)
            patch.setattr(torch, "bmm", arithmetic)
            result = conv_gram(conv, inputs)
        assert torch.equal(result[dead], reference[dead]) and torch.equal(result[:, dead], reference[:, dead])
        assert (result.diagonal()[~dead] > 0).all()


@pytest.mark.parametrize("seed", range(4))
def test_dead_columns_stay_exactly_zero_with_per_axis_strides_dilations_and_paddings(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    checked = 0
    for _ in range(40):
        kernel = tuple(int(v) for v in torch.randint(2, 5, (2,), generator=generator))
        stride, dilation = (tuple(int(v) for v in torch.randint(1, 4, (2,), generator=generator)) for _ in range(2))
        padding = tuple(int(v) for v in torch.randint(0, 3, (2,), generator=generator))
        height, width = (int(v) for v in torch.randint(6, 19, (2,), generator=generator))
        if any(d * (k - 1) + 1 > n + 2 * p for d, k, n, p in zip(dilation, kernel, (height, width), padding)):
            continue
        inputs = torch.randn(2, 2, height, width, generator=generator)
        top, left = (int(v) for v in torch.randint(0, 4, (2,), generator=generator))
        inputs[:, 0, top + 1:] = 0  # channel 0: a few top rows only
        inputs[:, 1, :, :left] = 0  # channel 1: no leftmost columns
        conv = nn.Conv2d(2, 1, kernel, stride=stride, dilation=dilation, padding=padding)
        reference = _reference(conv, inputs)
        dead = reference.diagonal() == 0
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.Tensor, "__matmul__", _rounding_noise)
            patch.setattr(torch, "bmm", _rounding_noise)
            result = conv_gram(conv, inputs)
        where = (kernel, stride, dilation, padding, height, width)
        assert torch.equal(result[dead], reference[dead]) and torch.equal(result[:, dead], reference[:, dead]), where
        assert (result.diagonal()[~dead] > 0).all(), where
        assert torch.allclose(result, reference, rtol=1e-12, atol=1e-12 * reference.abs().max().item()), where
        checked += int(dead.any())
    assert checked >= 5


def test_one_bright_input_row_leaves_the_dim_ones_their_digits() -> None:
    # A window that leaves the bright row out must not get its sum by subtracting sums of about 1e14
    # (which would leave about 1e-6 of rounding); summed directly, the dim rows keep their digits.
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    inputs = torch.full((1, 1, 12, 12), 1e-3, dtype=torch.float64)
    inputs[:, :, 0] = 1e7
    reference = _reference(conv, inputs)
    result = conv_gram(conv, inputs)
    assert torch.allclose(result.diagonal(), reference.diagonal(), rtol=1e-12, atol=0)
    assert (result.diagonal() > 0).all()


def test_exact_on_integer_inputs_in_odd_layouts_batches_and_dtypes() -> None:
    conv = nn.Conv2d(1, 2, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(2, 0))
    one_image = _integer_inputs(5, (1, 1, 11, 7))
    assert torch.equal(conv_gram(conv, one_image), _reference(conv, one_image))
    conv = nn.Conv2d(3, 2, 3, padding=1)
    inputs = _integer_inputs(6, (2, 3, 10, 8))
    expected = _reference(conv, inputs)
    assert torch.equal(conv_gram(conv, inputs.to(memory_format=torch.channels_last)), expected)
    assert torch.equal(conv_gram(conv, inputs.transpose(2, 3).contiguous().transpose(2, 3)), expected)
    float32 = conv_gram(conv, inputs, torch.float32)  # integer sums below 2**24: exact in float32 as well
    assert float32.dtype == torch.float32 and torch.equal(float32.double(), expected)


# Every form a Conv2d's padding can take: none, symmetric, per axis, 'valid', 'same' (with an even
# kernel or dilation it pads one side more), each with every padding mode that allows it.
PADDINGS = [(0, 1, 1), (1, 1, 1), ((2, 0), 1, 1), ((0, 1), 1, 1), ("valid", 1, 1), ("same", 1, 1), ("same", 1, 2)]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding,stride,dilation", PADDINGS)
@pytest.mark.parametrize("kernel", [(3, 3), (2, 3), (4, 1)])
def test_columns_are_what_the_layer_multiplies_and_the_gram_is_their_product(kernel, padding, stride, dilation,
                                                                              mode) -> None:
    # W @ X must be the layer's own output without bias, however the layer pads; integer weights and
    # inputs keep every sum exact, so both comparisons are exact in any order of the additions.
    conv = nn.Conv2d(2, 3, kernel, stride=stride, dilation=dilation, padding=padding, padding_mode=mode,
                     bias=False).double()
    conv.weight.data = _integer_inputs(1, tuple(conv.weight.shape)).double()
    inputs = _integer_inputs(2, (3, 2, 9, 8)).double()
    columns = layer_columns(conv, inputs)
    output = conv(inputs)
    assert torch.equal((conv.weight.flatten(1) @ columns).view(3, 3, -1).transpose(0, 1).reshape(output.shape), output)
    assert torch.equal(input_gram(conv, inputs), columns @ columns.t())


def test_a_kernel_taller_than_the_padded_input_is_a_clear_error() -> None:
    conv = nn.Conv2d(1, 1, 3, dilation=4)  # spans 9 rows
    with pytest.raises(ValueError, match="does not fit the padded 8x12 input"):
        conv_gram(conv, torch.ones(1, 1, 8, 12))


@pytest.mark.parametrize("layer", [nn.Linear(6, 2), nn.Conv2d(2, 3, 1), nn.Conv2d(2, 2, 1, stride=2),
                                   nn.Conv2d(4, 4, 3, groups=2, padding=1)])
def test_linear_pointwise_and_grouped_layers_take_the_plain_product(layer, monkeypatch) -> None:
    shape = (5, 6) if isinstance(layer, nn.Linear) else (5, layer.in_channels, 6, 6)
    inputs = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(gram, "conv_gram", lambda *args: pytest.fail("took the per-displacement products"))
    columns = layer_columns(layer, inputs.double())
    assert torch.equal(input_gram(layer, inputs), columns @ columns.t())


@pytest.mark.parametrize("layer", [nn.Conv2d(2, 2, (2, 1)), nn.Conv2d(2, 3, (1, 3), padding=(0, 1)),
                                   nn.Conv2d(2, 2, 3, stride=2)])
def test_other_convolutions_take_the_per_displacement_products(layer, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(gram, "conv_gram", lambda *args: calls.append(args) or torch.zeros(()))
    input_gram(layer, torch.ones(1, 2, 4, 4))
    assert len(calls) == 1


def test_hessian_accumulator_is_the_running_mean_of_two_x_x_transpose() -> None:
    conv = nn.Conv2d(2, 3, 3, padding=1)
    batches = [_integer_inputs(seed, (4, 2, 7, 7)) for seed in range(3)]
    accumulator = HessianAccumulator(conv)
    for batch in batches:
        accumulator.add(batch)
    expected = 2.0 / 12 * _reference(conv, torch.cat(batches))
    assert accumulator.images == 12
    assert torch.allclose(accumulator.hessian, expected, rtol=1e-14, atol=0)
