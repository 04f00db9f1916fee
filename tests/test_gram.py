"""The layer Gram matrix X X^T: the sliding convolution blocks against the plain im2col product."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

from mia_ptq_bench.quantize.gram import conv_gram, input_gram, layer_columns
from mia_ptq_bench.quantize.obs import HessianAccumulator

# Kernel (rows, columns), padding and input height: small maps (each block computed in full) and
# tall ones (blocks slid down from the one above), odd sizes; with every stride phase below.
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


def test_conv_gram_slides_blocks_and_agrees_to_rounding_on_real_valued_inputs() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    inputs = torch.randn(5, 3, 20, 20, generator=torch.Generator().manual_seed(0)).relu()
    calls = []
    with pytest.MonkeyPatch.context() as patch:  # count the block products
        patch.setattr(torch.Tensor, "__matmul__", lambda a, b: calls.append(1) or torch.matmul(a, b))
        result = conv_gram(conv, inputs)
    # 3 full blocks (row offsets 0, 1, 2) and 3 slid ones, each slide two thin products.
    assert len(calls) == 3 + 3 * 2
    reference = _reference(conv, inputs)
    assert torch.allclose(result, reference, rtol=1e-12, atol=1e-12 * reference.abs().max().item())


def test_a_column_that_is_zero_everywhere_keeps_an_exactly_zero_row_and_column() -> None:
    # Channel 0 lives only in the top input row: kernel row 2 never sees it (its window starts one
    # row lower), so that block's sum for it is the block above minus exactly its own mass.
    conv = nn.Conv2d(2, 2, 3, padding=1)
    inputs = torch.randn(4, 2, 12, 12, generator=torch.Generator().manual_seed(1)) * 1.37
    inputs[:, 0, 1:] = 0
    reference = _reference(conv, inputs)
    dead = reference.diagonal() == 0
    assert dead.sum() == 3  # channel 0's kernel row 2, all three kernel columns
    result = conv_gram(conv, inputs)
    assert torch.equal(result[dead], reference[dead]) and torch.equal(result[:, dead], reference[:, dead])
    assert (result.diagonal()[~dead] > 0).all()
    # Whether a slid sum leaves a residue depends on how the BLAS groups its additions; give every
    # product one, and the dead rows and columns must still come out exactly zero.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "__matmul__", lambda a, b: torch.matmul(a, b) + 1e-200)
        perturbed = conv_gram(conv, inputs)
    assert torch.equal(perturbed[dead], reference[dead]) and torch.equal(perturbed[:, dead], reference[:, dead])


@pytest.mark.parametrize("layer", [nn.Linear(6, 2), nn.Conv2d(2, 3, 1), nn.Conv2d(2, 3, (1, 3), padding=(0, 1)),
                                   nn.Conv2d(4, 4, 3, groups=2, padding=1)])
def test_layers_without_kernel_rows_to_slide_take_the_plain_product(layer) -> None:
    shape = (5, 6) if isinstance(layer, nn.Linear) else (5, layer.in_channels, 6, 6)
    inputs = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    columns = layer_columns(layer, inputs.double())
    assert torch.equal(input_gram(layer, inputs), columns @ columns.t())


def test_hessian_accumulator_is_the_running_mean_of_two_x_x_transpose() -> None:
    conv = nn.Conv2d(2, 3, 3, padding=1)
    batches = [_integer_inputs(seed, (4, 2, 7, 7)) for seed in range(3)]
    accumulator = HessianAccumulator(conv)
    for batch in batches:
        accumulator.add(batch)
    expected = 2.0 / 12 * _reference(conv, torch.cat(batches))
    assert accumulator.images == 12
    assert torch.allclose(accumulator.hessian, expected, rtol=1e-14, atol=0)
