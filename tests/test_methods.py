"""AdaRound, BRECQ, OBC and GPTQ: each against RTN, against brute force, and on bad input."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn

from mia_ptq_bench.data import load_dataset
from mia_ptq_bench.errors import BenchError
from mia_ptq_bench.models import build_model, quantizable_layers
from mia_ptq_bench.quantize import QUANTIZERS, Calibration, audit_model
from mia_ptq_bench.quantize.grid import fit_grid
from mia_ptq_bench.quantize.audit import distinct_per_row
from mia_ptq_bench.quantize.batchnorm import reestimate_batchnorm
from mia_ptq_bench.quantize.calibration import calibration_count, calibration_set
from mia_ptq_bench.quantize.obs import (NumericalError, gptq_quantize, gptq_quantize_many, inverse_hessian, obc_quantize, obc_quantize_many,
                                        round_to_grid)
from mia_ptq_bench.quantize.rounding import RoundingSchedule, learn_rounding
from mia_ptq_bench.quantize.units import block_units, capture, layer_units
from mia_ptq_bench.spec import PrecisionPlan, load_task
from mia_ptq_bench.spec.schema import DatasetSpec, ModelSpec

FAST = {  # 200 steps instead of 20,000, with a 10x learning rate to match
    "adaround": {"iters": 200, "lr": 0.01, "inputs": "full_precision"},
    "brecq": {"iters": 200, "lr": 0.01, "inputs": "full_precision"},
    "obc": {"calibration": 64, "rounds": 2},
    "gptq": {"sequential": False},
}


_DIGITS = load_dataset(DatasetSpec(name="digits", image_size=16))


def calibration(count: int = 64, seed: int = 0) -> Calibration:
    """Real images (digits at 16px): their pixels are correlated, as every method's Hessian assumes."""
    index = torch.randperm(len(_DIGITS.pool), generator=torch.Generator().manual_seed(seed))[:count]
    return Calibration(_DIGITS.pool.images[index], _DIGITS.normalize, crop_padding=2, hflip=True, seed=seed)


def trained_like(arch: str, options: dict | None = None, width: float = 0.25) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch=arch, width=width, options=options or {}), (1, 16, 16), 10)
    with torch.no_grad():  # BN statistics of real activations, so that folding matters
        model.train()
        model(calibration(128, seed=1).images)
    return model.eval()


def output_errors(original: nn.Module, quantized: nn.Module, images: torch.Tensor, blocks: bool) -> dict[str, float]:
    """Per layer (or block): squared error of the quantized unit's output, both fed the original's inputs
    (a layer's own output: what AdaRound, GPTQ and OBC each reconstruct)."""
    split = block_units if blocks else layer_units
    errors = {}
    for unit, twin in zip(split(original), split(quantized)):
        assert unit.name == twin.name
        x = capture(original, unit.first, images, "input")
        target = capture(original, unit.last, images, "output")
        with torch.no_grad():
            errors[unit.name] = float((twin.module(x) - target).square().sum())
    return errors


SMALL_NETS = [("mlp", {"hidden": [32]}), ("cnn", {"batchnorm": True, "hidden": 16})]


# Every method on the small nets; on ResNet18, BRECQ (its residual blocks) and GPTQ, to stay fast.
@pytest.mark.parametrize("method, arch, options", [(m, a, o) for m in ("adaround", "brecq", "obc", "gptq")
                                                   for a, o in SMALL_NETS] + [("brecq", "resnet18", {}),
                                                                              ("gptq", "resnet18", {})])
def test_each_method_reconstructs_better_than_rtn(method: str, arch: str, options: dict) -> None:
    model = trained_like(arch, options, width=0.125 if arch == "resnet18" else 0.25)
    plan = PrecisionPlan.parse("w2")
    cal = calibration()
    folded = QUANTIZERS.get("rtn")({"bn": "fold", "search": "lp"})
    reference = folded.quantize(copy.deepcopy(model), cal, PrecisionPlan.parse("w16"))  # folded, ~unquantized
    rtn = QUANTIZERS.get("rtn")().quantize(copy.deepcopy(model), cal, plan)
    ours = QUANTIZERS.get(method)(FAST[method]).quantize(copy.deepcopy(model), cal, plan)
    assert all(a.passed for a in audit_model(ours, plan))
    blocks = method == "brecq"
    rtn_errors = output_errors(reference, rtn, cal.images, blocks)
    our_errors = output_errors(reference, ours, cal.images, blocks)
    # At least 10% better everywhere: measured margins are 20% to 300x, so no machine's float rounding can
    # decide this test; a broken method lands at or above RTN.
    worse = {name: round(our_errors[name] / rtn_errors[name], 3) for name in rtn_errors
             if our_errors[name] > 0.9 * rtn_errors[name]}
    assert not worse, f"{method} does not reconstruct 10% better than RTN at {worse} (error ratio to RTN)"


def test_adaround_reconstructs_each_layer_s_own_output_as_the_study_does() -> None:
    """Its units are the layers alone, also where a ReLU module follows a layer once (the stem, an MLP's
    layers), as in the study's code; BRECQ's stem keeps its ReLU, as in BRECQ's code."""
    model = QUANTIZERS.get("rtn")({"bn": "fold"}).quantize(trained_like("resnet10", width=0.125), calibration(8),
                                                           PrecisionPlan.parse("w16"))
    units = QUANTIZERS.get("adaround")().units(model)
    assert [u.name for u in units] == [name for name, _ in quantizable_layers(model)]
    assert all(u.first is u.last is model.get_submodule(u.name) and len(u.module) == 1 for u in units)
    stem = QUANTIZERS.get("brecq")().units(model)[0]
    assert stem.name == "conv1" and isinstance(stem.last, nn.ReLU)


DECISION_MARGIN = 1e-6  # relative: float64 rounding (~1e-16) cannot flip a choice this far from a tie


def assert_clear_rounding(values: torch.Tensor) -> None:
    """Each value (in grid steps) lies clearly off the half-way point between two grid values."""
    distance = ((values - torch.floor(values)) - 0.5).abs()
    assert float(distance.min()) > DECISION_MARGIN, "test data has a rounding tie; choose another seed"


def brute_force_obc_row(w0: torch.Tensor, h: torch.Tensor, scale: float, zero: float, levels: int) -> torch.Tensor:
    """Greedy OBC order found by re-solving the least-squares problem for every candidate at every step.

    Every decision it takes is checked to be clear of a tie, so the comparison with the fast
    sweep at 1e-9 holds on any machine.
    """
    k = w0.numel()
    fixed: dict[int, float] = {}

    def optimum(fixed_values: dict[int, float]) -> torch.Tensor:
        free = [i for i in range(k) if i not in fixed_values]
        w = w0.clone()
        for i, v in fixed_values.items():
            w[i] = v
        if free:
            done = list(fixed_values)
            delta = torch.tensor([fixed_values[i] - w0[i] for i in done], dtype=h.dtype)
            w[free] = w0[free] - torch.linalg.solve(h[free][:, free], h[free][:, done] @ delta)
        return w

    def loss(w: torch.Tensor) -> float:
        d = w - w0
        return float(d @ h @ d)

    current = w0.clone()
    while len(fixed) < k:
        free = [i for i in range(k) if i not in fixed]
        q = round_to_grid(current, torch.tensor(scale, dtype=h.dtype), torch.tensor(zero, dtype=h.dtype), levels)
        assert_clear_rounding(current[free] / scale)
        err = {i: float((current[i] - q[i]) ** 2) for i in free}
        losses = sorted(loss(optimum({**fixed, i: float(q[i])})) for i in free)
        assert len(losses) == 1 or losses[1] - losses[0] > DECISION_MARGIN * losses[1], "near-tie in the greedy order"
        assert all(abs(e - 0.25 * scale**2) > DECISION_MARGIN * scale**2 for e in err.values()), "drift test at a tie"
        if any(e > 0.25 * scale**2 for e in err.values()) and current[min(free, key=lambda i: loss(optimum({**fixed, i: float(q[i])})))] != 0:
            choice = max(free, key=lambda i: err[i])
        else:
            choice = min(free, key=lambda i: loss(optimum({**fixed, i: float(q[i])})))
        fixed[choice] = float(q[choice])
        current = optimum(fixed)
    return torch.tensor([fixed[i] for i in range(k)], dtype=h.dtype)


def brute_force_gptq(w0: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int):
    """Columns in order; after fixing each, the remaining ones are re-solved exactly by least squares."""
    rows, k = w0.shape
    q = torch.zeros_like(w0)
    current = w0.clone()
    for c in range(k):
        assert_clear_rounding(current[:, c] / scale[:, 0])
        q[:, c] = round_to_grid(current[:, c], scale[:, 0], zero[:, 0], levels)
        rest = list(range(c + 1, k))
        if rest:
            done = list(range(c + 1))
            delta = q[:, done] - w0[:, done]
            current[:, rest] = w0[:, rest] - torch.linalg.solve(h[rest][:, rest], (h[rest][:, done] @ delta.t())).t()
    return q


def tiny_layer(seed: int = 0, rows: int = 3, columns: int = 6):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(40, columns, generator=generator, dtype=torch.float64) @ torch.randn(columns, columns, generator=generator, dtype=torch.float64)
    h = 2 / 40 * x.t() @ x
    w = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    return w, h


@pytest.mark.parametrize("seed, levels", list(itertools.product(range(4), (3, 4))))
def test_obc_matches_brute_force_greedy(seed: int, levels: int) -> None:
    w, h = tiny_layer(seed)
    grid = fit_grid(w, levels)
    ours = obc_quantize(w, h, grid, parallel=2, dtype=torch.float64)
    for r in range(w.shape[0]):
        expected = brute_force_obc_row(w[r], h, float(grid.scale[r]), float(grid.zero_point[r]), levels)
        torch.testing.assert_close(ours[r], expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_obc_compaction_changes_nothing(dtype: torch.dtype) -> None:
    w, h = tiny_layer(11, rows=5, columns=40)
    grid = fit_grid(w, 3)
    assert torch.equal(obc_quantize(w, h, grid, parallel=3, dtype=dtype, compact=1.0),
                       obc_quantize(w, h, grid, parallel=3, dtype=dtype, compact=0.9))


@pytest.mark.parametrize("batch_bytes", [1, 10**9])  # one row per batch (parallel=2: two), or every row at once
def test_obc_of_several_models_at_once_equals_each_alone(batch_bytes: int) -> None:
    layers = [tiny_layer(seed, rows=4, columns=12) for seed in (1, 2, 3)]
    grids = [fit_grid(w, 3) for w, _ in layers]
    together = obc_quantize_many([w for w, _ in layers], [h for _, h in layers], grids, parallel=2,
                                 dtype=torch.float64, batch_bytes=batch_bytes)
    for (w, h), grid, q in zip(layers, grids, together):
        assert torch.equal(q, obc_quantize(w, h, grid, parallel=4, dtype=torch.float64))


def test_obc_keeps_full_precision_hessians_across_plans_without_changing_results() -> None:
    model = trained_like("mlp", {"hidden": [16]})
    cal = calibration(32)
    reused = QUANTIZERS.get("obc")()
    reused.quantize(copy.deepcopy(model), cal, PrecisionPlan.parse("w4"))  # fills the quantizer's Hessian cache
    second = reused.quantize(copy.deepcopy(model), cal, PrecisionPlan.parse("w2"))
    fresh = QUANTIZERS.get("obc")().quantize(copy.deepcopy(model), cal, PrecisionPlan.parse("w2"))
    assert all(torch.equal(a, b) for a, b in zip(second.state_dict().values(), fresh.state_dict().values()))
    # a different calibration set is a different key: not served from the cache
    other = reused.quantize(copy.deepcopy(model), calibration(32, seed=5), PrecisionPlan.parse("w2"))
    assert any(not torch.equal(a, b) for a, b in zip(other.state_dict().values(), fresh.state_dict().values()))


@pytest.mark.parametrize("seed, block", list(itertools.product(range(4), (1, 2, 128))))
def test_gptq_matches_brute_force_least_squares(seed: int, block: int) -> None:
    w, h = tiny_layer(seed)
    grid = fit_grid(w, 4)
    ours = gptq_quantize(w, h, grid, block_size=block, rel_damp=0.0, dtype=torch.float64)
    expected = brute_force_gptq(w, h, grid.scale.double(), grid.zero_point.double(), 4)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-9)


def test_gptq_act_order_is_a_permutation_of_the_same_procedure() -> None:
    w, h = tiny_layer(7)
    grid = fit_grid(w, 4)
    order = torch.argsort(torch.diag(h), descending=True)
    ours = gptq_quantize(w, h, grid, act_order=True, rel_damp=0.0, dtype=torch.float64)
    permuted = brute_force_gptq(w[:, order], h[order][:, order], grid.scale.double(), grid.zero_point.double(), 4)
    torch.testing.assert_close(ours[:, order], permuted, rtol=0, atol=1e-9)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_of_several_models_at_once_is_each_models_own_least_squares(act_order: bool) -> None:
    # Three models' versions of one layer, block size 2 so the lazy update between blocks runs;
    # with act_order each model has its own column order.
    layers = [tiny_layer(seed, rows=4, columns=7) for seed in (1, 2, 3)]
    grids = [fit_grid(w, 4) for w, _ in layers]
    together = gptq_quantize_many([w for w, _ in layers], [h for _, h in layers], grids, block_size=2, rel_damp=0.0,
                                  act_order=act_order, dtype=torch.float64)
    for (w, h), grid, q in zip(layers, grids, together):
        order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(w.shape[1])
        expected = brute_force_gptq(w[:, order], h[order][:, order], grid.scale.double(), grid.zero_point.double(), 4)
        torch.testing.assert_close(q[:, order], expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("batch_bytes", [1, None])  # one model per sweep, or all three in one
def test_gptq_of_several_models_at_once_equals_each_alone_in_float32(act_order: bool, batch_bytes) -> None:
    # float32 as evaluate runs it, 7 columns in blocks of 2 (the lazy update runs between blocks), and the
    # second model with a dead input (a zero row and column of H) that the others do not have.
    layers = [tiny_layer(seed, rows=4, columns=7) for seed in (4, 5, 6)]
    dead = layers[1][1].clone()
    dead[2, :] = 0
    dead[:, 2] = 0
    layers[1] = (layers[1][0], dead)
    weights = [w.float() for w, _ in layers]
    grids = [fit_grid(w, 4) for w in weights]
    settings = dict(block_size=2, rel_damp=0.01, act_order=act_order, dtype=torch.float32)
    together = gptq_quantize_many(weights, [h for _, h in layers], grids, batch_bytes=batch_bytes, **settings)
    for weight, (_, h), grid, q in zip(weights, layers, grids, together):
        assert q.dtype == torch.float32
        assert torch.equal(q, gptq_quantize(weight, h, grid, **settings))
    assert (together[1][:, 2] == 0).all()  # a dead input's weights are zeroed


def test_gptq_of_several_models_at_once_damps_only_the_singular_hessian() -> None:
    # The second model's H = [[4, 4], [4, 4]] factorises exactly to a zero pivot (see the fallback test
    # below): it alone takes the fallback damping; the first model's result is as if swept alone.
    w = torch.tensor([[0.3, -0.7], [1.1, 0.2]], dtype=torch.float64)
    regular = torch.tensor([[1.0, -0.9], [-0.9, 1.0]], dtype=torch.float64)
    singular = torch.tensor([[4.0, 4.0], [4.0, 4.0]], dtype=torch.float64)
    grid = fit_grid(w, 3)
    first, second = gptq_quantize_many([w, w], [regular, singular], [grid, grid], rel_damp=0.0, dtype=torch.float64)
    assert torch.equal(first, gptq_quantize(w, regular, grid, rel_damp=0.0, dtype=torch.float64))
    assert torch.equal(second, gptq_quantize(w, singular, grid, rel_damp=0.0, dtype=torch.float64))
    assert not torch.equal(first, second)
    with pytest.raises(ValueError, match="same weight shape"):
        gptq_quantize_many([w, w[:, :1]], [regular, regular[:1, :1]], [grid, grid])


@pytest.mark.parametrize("levels", [4, 16])
def test_adaround_rounding_variables_end_at_zero_or_one(levels: int) -> None:
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(256, 16))
    x = torch.relu(torch.randn(512, 256))
    target = layer(x).detach()
    grid = fit_grid(layer[0].weight.detach(), levels)
    # 2,000 steps instead of 20,000, with a 10x learning rate to match
    schedule = RoundingSchedule(iters=2000, batch_size=32, lr=1e-2, reg_weight=0.01, beta_start=20, beta_end=2,
                                warmup=0.2, seed=0)
    weights, decided = learn_rounding([layer], ["0.weight"], {"0.weight": levels}, [{"0.weight": grid}], x[:, None],
                                      target[:, None], schedule)
    assert decided[0] > 0.99  # soft choices within 0.01 of 0 or 1: hard rounding changes almost nothing
    values = weights[0]["0.weight"]
    exact = layer[0].weight.detach()
    rtn = grid.round_to_nearest(exact)
    assert float((x @ (values - exact).t()).square().sum()) < float((x @ (rtn - exact).t()).square().sum())


def test_batched_models_equal_one_at_a_time() -> None:
    models = [trained_like("mlp", {"hidden": [16]}) for _ in range(3)]
    for i, m in enumerate(models):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * i)
    cals = [calibration(32, seed=i) for i in range(3)]
    plan = PrecisionPlan.parse("w2")
    quantizer = QUANTIZERS.get("adaround")({"iters": 100})
    together = quantizer.quantize_many([copy.deepcopy(m) for m in models], cals, plan)
    for model, cal, batched in zip(models, cals, together):
        alone = quantizer.quantize(copy.deepcopy(model), cal, plan)
        for (name, a), b in zip(alone.state_dict().items(), batched.state_dict().values()):
            assert (a != b).float().mean() < 0.01, name  # at most a float-rounding tie flips a weight


def test_a_unit_run_model_by_model_gives_each_model_what_it_gets_alone() -> None:
    # A convolution with one input channel runs its models one by one inside each step (faster on a
    # CPU than vmap's grouped convolution): then every model's rounding is exactly its own. (Its learned
    # continuous variables can differ in the last bits, ~1e-7, where sigmoid's vector kernels end in
    # scalar code on some CPUs; the smallest margin of a decision here is thousands of times wider.)
    from mia_ptq_bench.quantize.common import GridConfig
    from mia_ptq_bench.quantize.rounding import RoundingSchedule, learn_rounding, runs_per_model

    cpu = torch.device("cpu")
    units = []
    for seed in range(3):
        torch.manual_seed(seed)
        units.append(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4).eval(), nn.ReLU()))
    assert runs_per_model(units[0], cpu) and not runs_per_model(nn.Sequential(nn.Conv2d(2, 4, 3)), cpu)
    assert not runs_per_model(units[0], torch.device("cuda"))  # measured on CPUs only: CUDA keeps vmap
    inputs = torch.randn(3, 24, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        targets = torch.stack([u(x) + 0.01 * torch.randn_like(u(x)) for u, x in zip(units, inputs)])
    grids = [{"0.weight": GridConfig().grid(u[0].weight.detach(), 4)} for u in units]
    schedule = RoundingSchedule(60, 8, 1e-2, 0.01, 20.0, 2.0, 0.2, 0)
    with torch.enable_grad():
        together, _ = learn_rounding(units, ["0.weight"], {"0.weight": 4}, grids, inputs.transpose(0, 1),
                                     targets.transpose(0, 1), schedule)
        for m, unit in enumerate(units):
            alone, _ = learn_rounding([unit], ["0.weight"], {"0.weight": 4}, grids[m:m + 1],
                                      inputs[m:m + 1].transpose(0, 1), targets[m:m + 1].transpose(0, 1), schedule)
            assert torch.equal(together[m]["0.weight"], alone[0]["0.weight"])


def side_by_side(x: torch.Tensor) -> torch.Tensor:
    """(models, n, C, ...) -> (n, models x C, ...): the models side by side along the channels."""
    return x.transpose(0, 1).flatten(1, 2)


def randomise_batchnorm(module: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from their defaults, so BatchNorm does something."""
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2), bn.weight.normal_(), bn.bias.normal_()
    return module.eval()


def assert_grouped_forward_computes_each_models_output(units: list[nn.Module], x: torch.Tensor) -> None:
    """x (models, n, ...): the grouped pass over all units equals each unit on its own input."""
    from mia_ptq_bench.quantize.rounding import grouped_forward

    run = grouped_forward(units[0], len(units))
    params, buffers = torch.func.stack_module_state(units)
    with torch.no_grad():
        together = run(params, buffers, side_by_side(x))
        alone = side_by_side(torch.stack([unit(xm) for unit, xm in zip(units, x)]))
    assert together.shape == alone.shape and torch.allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_a_residual_block_as_grouped_convolutions_computes_what_each_model_computes(stride: int) -> None:
    from torchvision.models.densenet import _DenseLayer
    from mia_ptq_bench.models.resnet import BasicBlock
    from mia_ptq_bench.quantize.rounding import grouped_forward

    blocks = []
    for seed in range(3):
        torch.manual_seed(seed)
        blocks.append(randomise_batchnorm(BasicBlock(4, 8 if stride == 2 else 4, stride)))
    assert (blocks[0].downsample is not None) == (stride == 2)
    assert_grouped_forward_computes_each_models_output(
        blocks, torch.randn(3, 5, 4, 8, 8, generator=torch.Generator().manual_seed(1)))
    assert grouped_forward(_DenseLayer(4, 2, 2, 0.0).eval(), 3) is None  # concatenates channels: stays with vmap


@pytest.mark.parametrize("conv", [dict(bias=False), dict(bias=True, stride=2, groups=2, dilation=2, padding=2)])
def test_a_convolution_unit_as_one_grouped_convolution_computes_what_each_model_computes(conv: dict) -> None:
    units = []
    for seed in range(3):
        torch.manual_seed(seed)
        units.append(randomise_batchnorm(nn.Sequential(nn.Conv2d(4, 4, 3, **conv), nn.BatchNorm2d(4), nn.ReLU())))
    assert_grouped_forward_computes_each_models_output(
        units, torch.randn(3, 5, 4, 9, 9, generator=torch.Generator().manual_seed(1)))


def test_only_units_of_convolutions_relus_and_sums_run_grouped_and_they_learn_the_same_rounding() -> None:
    from mia_ptq_bench.quantize.common import GridConfig
    from mia_ptq_bench.quantize.rounding import RoundingSchedule, grouped_forward, learn_rounding

    assert grouped_forward(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4).train()), 2) is None
    assert grouped_forward(nn.Sequential(nn.Conv2d(2, 4, 3), nn.MaxPool2d(2)), 2) is None
    assert grouped_forward(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")), 2) is None
    assert grouped_forward(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), 2) is None
    assert grouped_forward(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4).eval(), nn.ReLU()), 2)
    units = []
    for seed in range(3):
        torch.manual_seed(seed)
        units.append(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4).eval(), nn.ReLU()))
    inputs = torch.randn(3, 24, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        targets = torch.stack([u(x) + 0.01 * torch.randn_like(u(x)) for u, x in zip(units, inputs)])
    grids = [{"0.weight": GridConfig().grid(u[0].weight.detach(), 4)} for u in units]
    schedule = RoundingSchedule(60, 8, 1e-2, 0.01, 20.0, 2.0, 0.2, 0)
    with torch.enable_grad():
        learned = {way: learn_rounding(units, ["0.weight"], {"0.weight": 4}, grids, inputs.transpose(0, 1),
                                       targets.transpose(0, 1), schedule, way=way)
                   for way in ("grouped", "vmap", "one_by_one")}
        with pytest.raises(ValueError, match="grouped convolutions"):
            learn_rounding([nn.Sequential(nn.Linear(3, 2))], ["0.weight"], {"0.weight": 4},
                           [{"0.weight": GridConfig().grid(torch.ones(2, 3), 4)}], torch.ones(4, 1, 3),
                           torch.ones(4, 1, 2), schedule, way="grouped")
    for way in ("grouped", "one_by_one"):
        for theirs, vmapped in zip(learned[way][0], learned["vmap"][0]):
            flips = (theirs["0.weight"] != vmapped["0.weight"]).float().mean()
            assert flips < 0.01, way  # the same optimisation: at most a float-rounding tie flips a weight
        assert learned[way][1] == pytest.approx(learned["vmap"][1], abs=0.01)


@pytest.mark.parametrize("shape", [(3, 2, 4, 4, 4), (2, 8, 10), (1, 4, 3, 2, 2)])
def test_reconstruction_loss_is_the_per_model_lp_loss_with_the_same_gradient(shape: tuple) -> None:
    # Values on a 1/8 grid and averages over powers of two make every step exact in float32, on any
    # CPU: the fused loss must then equal the reference formula and give the same gradient, bit for bit.
    from mia_ptq_bench.quantize.rounding import reconstruction_loss

    generator = torch.Generator().manual_seed(sum(shape))
    output = (torch.randint(-16, 17, shape, generator=generator) / 8).requires_grad_()
    target = torch.randint(-16, 17, shape, generator=generator) / 8
    fused = reconstruction_loss(output, target, shape[0] * shape[2])
    (fused_grad,) = torch.autograd.grad(fused, output)
    error = (output - target).pow(2)
    reference = error.sum(dim=2).mean(dim=tuple(range(1, error.ndim - 1))).sum()
    (reference_grad,) = torch.autograd.grad(reference, output)
    assert float(fused.detach()) == float(reference.detach()) > 0
    assert torch.equal(fused_grad, reference_grad)
    # Models do not mix: changing one model's output changes only that model's term.
    moved = output.detach().clone()
    moved[0] += 1
    channels = shape[2]
    per_model = [float(reconstruction_loss(o[None], t[None], channels)) for o, t in zip(moved, target)]
    assert float(reconstruction_loss(moved, target, shape[0] * channels)) == sum(per_model)
    assert per_model[1:] == [float(reconstruction_loss(o[None], t[None], channels))
                             for o, t in zip(output.detach()[1:], target[1:])]
    # The grouped layout (batch, models x channels, ...) holds the same values: the same loss.
    if len(shape) == 5:
        assert float(reconstruction_loss(side_by_side(moved), side_by_side(target), shape[0] * channels)) == sum(per_model)


def test_reconstruction_gradient_is_the_losss_gradient_bit_for_bit() -> None:
    # The same exact values as above: a gradient computed without the loss must be autograd's, bit for bit.
    from mia_ptq_bench.quantize.rounding import reconstruction_gradient, reconstruction_loss

    generator = torch.Generator().manual_seed(0)
    output = (torch.randint(-16, 17, (4, 6, 4, 4), generator=generator) / 8).requires_grad_()
    target = torch.randint(-16, 17, (4, 6, 4, 4), generator=generator) / 8
    (expected,) = torch.autograd.grad(reconstruction_loss(output, target, 6), output)
    assert torch.equal(reconstruction_gradient(output.detach(), target, 6), expected) and expected.abs().max() > 0


@pytest.mark.parametrize("beta", [None, 20.0, 7.3, 2.0])
def test_rounding_gradient_written_out_is_autograds(beta: float | None) -> None:
    # AdaRound's step writes V's chain rule out by hand. Autograd on the formula it stands for must
    # agree, also where the formula has kinks: soft choices clipped at 0 and 1 (V = +-10), weights
    # whose grid point is pinned by the clamp at either end of the grid, and the regulariser's |.|.
    from mia_ptq_bench.quantize.rounding import _Layer, initial_v, soft_choice

    generator = torch.Generator().manual_seed(1)
    levels, shape = 4, torch.Size([2, 3, 2, 3, 3])  # (models, C_out, C_in, k, k)
    scale = torch.rand(2, 3, 1, generator=generator) + 0.5
    zero = torch.full((2, 3, 1), 1.0)
    floor = torch.randint(-3, 4, (2, 3, 18), generator=generator).float()  # grid points -2..4 of 0..3
    v = initial_v(torch.rand(2, 3, 18, generator=generator) * 0.98 + 0.01)
    v[0, 0, :6] = torch.tensor([10.0, -10.0, 10.0, -10.0, 0.0, 3.0])
    floor[0, 0, :4] = torch.tensor([-1.0, -1.0, 2.0, 2.0])  # base -1 (below the grid) and 3 (its last point)
    assert ((floor + zero < 0).any() and (floor + zero == levels - 1).any() and (floor + zero > levels - 1).any())
    weight_grad = torch.randn(shape, generator=generator)

    reference_v = v.clone().requires_grad_()
    integers = torch.clamp(floor + soft_choice(reference_v) + zero, 0, levels - 1)
    reference_weights = ((integers - zero) * scale).reshape(shape)
    objective = (reference_weights * weight_grad).sum()
    if beta is not None:
        objective = objective + 0.01 * (1 - (2 * soft_choice(reference_v) - 1).abs().pow(beta)).sum()
    objective.backward()

    layer = _Layer("0.weight", shape, floor, scale, zero, levels, v.clone().requires_grad_())
    soft = layer.soft_weights()
    torch.testing.assert_close(soft, reference_weights.detach(), rtol=1e-6, atol=1e-6)
    layer.set_gradient(weight_grad, 0.01, beta)
    torch.testing.assert_close(layer.v.grad, reference_v.grad, rtol=1e-5, atol=1e-7)
    assert (reference_v.grad == 0).any() and (reference_v.grad != 0).any()  # the kinks were reached


def test_learned_rounding_follows_the_autograd_loop_it_stands_for() -> None:
    # The whole step wired up (each layer's gradient, the warm-up before the regulariser and its
    # annealed beta) against the loop as the study's code writes it (``autograd_learn_rounding``:
    # autograd through the soft weights, the regulariser a term of the loss). Only float rounding
    # differs, so at most a tie flips.
    from mia_ptq_bench.quantize.common import GridConfig
    from mia_ptq_bench.quantize.rounding import RoundingSchedule, autograd_learn_rounding, learn_rounding

    torch.manual_seed(0)
    unit = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1))
    x = torch.randn(64, 3, 6, 6)
    with torch.no_grad():
        y = unit(x) + 0.05 * torch.randn(64, 4, 6, 6)
    keys, levels = ["0.weight", "2.weight"], {"0.weight": 4, "2.weight": 4}
    grids = {key: GridConfig().grid(unit.get_parameter(key).detach(), 4) for key in keys}
    schedule = RoundingSchedule(iters=60, batch_size=16, lr=5e-2, reg_weight=0.05, beta_start=20, beta_end=2,
                                warmup=0.5, seed=0)
    with torch.enable_grad():
        (ours,), _ = learn_rounding([unit], keys, levels, [grids], x[:, None], y[:, None], schedule)
        (reference,), (decided,) = autograd_learn_rounding([unit], keys, levels, [grids], x[:, None], y[:, None],
                                                           schedule)
    assert 0 < decided < 1
    for key in keys:
        nearest = grids[key].round_to_nearest(unit.get_parameter(key).detach().flatten(1)).reshape(ours[key].shape)
        assert (reference[key] != nearest).float().mean() > 0.05, key  # roundings moved: wiring errors would show
        assert (ours[key] != reference[key]).float().mean() < 0.01, key


@pytest.mark.parametrize("method", ["adaround", "brecq", "obc", "gptq"])
def test_methods_refuse_fp32_plan(method: str) -> None:
    assert "fp32" in QUANTIZERS.get(method)().unsupported(PrecisionPlan.parse("fp32"))


@pytest.mark.parametrize("method", ["rtn", "adaround", "obc", "gptq"])
def test_unsupported_layer_is_a_clear_error(method: str) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Bilinear(1024, 1024, 10))
    with pytest.raises(BenchError, match="Bilinear.*cannot quantize"):
        QUANTIZERS.get(method)(FAST.get(method, {})).quantize(model, calibration(), PrecisionPlan.parse("w4"))


def test_grouped_convolution_is_refused_by_hessian_methods() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Flatten(),
                          nn.Linear(1024, 10))
    with pytest.raises(BenchError, match="grouped convolution"):
        QUANTIZERS.get("gptq")().quantize(model, calibration(), PrecisionPlan.parse("w4"))


@pytest.mark.parametrize("method", ["adaround", "brecq", "obc", "gptq"])
def test_nan_calibration_activations_are_a_clear_error(method: str) -> None:
    model = trained_like("mlp", {"hidden": [16]})
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(BenchError, match="non-finite"):
        QUANTIZERS.get(method)(FAST[method]).quantize(model, calibration(), PrecisionPlan.parse("w4"))


def _cumulative_statistics(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The running means and variances a cumulative average over ``batches`` gives, written out."""
    model = copy.deepcopy(model)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    return [t for bn in norms for t in (bn.running_mean, bn.running_var)]


def test_batchnorm_is_reestimated_without_a_batch_of_one_image() -> None:
    # ResNet10 on 8x8 images ends on a 1x1 map, where a BatchNorm refuses a batch of one image.
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="resnet10", width=0.125), (1, 8, 8), 10).eval()
    images = torch.randn(300, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    def statistics(count: int) -> list[torch.Tensor]:
        again = reestimate_batchnorm(copy.deepcopy(model), images[:count], batch_size=128)
        assert not again.training
        return [t for m in again.modules() if isinstance(m, nn.BatchNorm2d) for t in (m.running_mean, m.running_var)]

    for got, want in zip(statistics(257), _cumulative_statistics(model, [images[:128], images[128:257]])):
        assert torch.equal(got, want)  # 128 + 129: the last image joins the batch before it
    for got, want in zip(statistics(300), _cumulative_statistics(model, [images[:128], images[128:256],
                                                                        images[256:300]])):
        assert torch.equal(got, want)  # no batch of one: the batches as they were
    with pytest.raises(BenchError, match=r"re-estimating BatchNorm statistics on 1 calibration image\(s\): Expected "
                                         r"more than 1 value per channel .*; calibrate on more images"):
        statistics(1)


def test_study_bn_policies() -> None:
    policies = {name: QUANTIZERS.get(name)({"bn": "study"}).bn_policy for name in ("adaround", "brecq", "obc")}
    assert policies == {"adaround": "keep", "brecq": "fold", "obc": "reestimate"}
    assert {QUANTIZERS.get(name)().bn_policy for name in ("rtn", "adaround", "brecq", "obc", "gptq")} == {"fold"}


def test_defaults_are_the_study_s_but_for_the_documented_step_count() -> None:
    ada, brecq = QUANTIZERS.get("adaround")().config, QUANTIZERS.get("brecq")().config
    # the study: 20,000 steps at lr 1e-3; the benchmark: a tenth of the steps at ten times the rate
    assert (ada.iters, ada.batch_size, ada.lr, ada.reg_weight, ada.beta_start, ada.beta_end, ada.warmup) == (
        2000, 32, 1e-2, 0.001, 20.0, 2.0, 0.2)
    assert brecq.reg_weight == 0.01 and (brecq.iters, brecq.lr) == (2000, 1e-2)
    obc = QUANTIZERS.get("obc")()
    assert (obc.calibration_size(1024), obc.config.rounds, obc.config.parallel, obc.config.rel_damp) == (2048, 10, 32, 0.0)


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet18",
                                  pytest.param("resnet50", marks=pytest.mark.slow),
                                  pytest.param("densenet121", marks=pytest.mark.slow)])
def test_every_method_on_every_architecture_and_plan(arch: str) -> None:
    plans = ["w4", "w2", "w1.58", "w1.58-last8"]
    cal = calibration(16)
    model = trained_like(arch, {"batchnorm": True} if arch == "cnn" else {}, width=0.0625)
    for method in ("adaround", "brecq", "obc", "gptq"):
        config = {"adaround": {"iters": 2}, "brecq": {"iters": 2}, "obc": {"parallel": 64}, "gptq": {}}[method]
        plan = PrecisionPlan.parse(plans[(len(arch) + len(method)) % 4])
        quantized = QUANTIZERS.get(method)(config).quantize(copy.deepcopy(model), cal, plan)
        report = audit_model(quantized, plan)
        assert all(r.passed for r in report), (arch, method, plan)
        assert torch.isfinite(quantized(cal.images)).all()


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("method", ["adaround", "brecq", "obc", "gptq"])
def test_every_method_takes_convolutions_padded_any_way_torch_allows(method: str) -> None:
    # 'same' with an even kernel pads one side more, and the padding modes fill the border with
    # inputs, not zeros: a Hessian method that zero-padded read the wrong columns (and 'same' crashed it).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, (2, 3), padding="same", padding_mode="reflect"), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding="valid"), nn.Flatten(), nn.Linear(4 * 14 * 14, 10)).eval()
    cal = calibration(16)
    config = {"adaround": {"iters": 2}, "brecq": {"iters": 2}, "obc": {"calibration": 16}, "gptq": {}}[method]
    plan = PrecisionPlan.parse("w4")
    quantized = QUANTIZERS.get(method)(config).quantize(copy.deepcopy(model), cal, plan)
    assert all(r.passed for r in audit_model(quantized, plan))
    assert torch.isfinite(quantized(cal.images)).all()


def test_the_largest_calibration_seed_a_task_may_give_draws_every_models_members() -> None:
    # model m draws with seed + m, which numpy refuses past 2**32 - 1: it wraps, so model 1 draws with seed 0
    spec = load_task("digits-mlp")
    top = spec.model_copy(update={"calibration": spec.calibration.model_copy(update={"seed": 2**32 - 1})})
    zero = spec.model_copy(update={"calibration": spec.calibration.model_copy(update={"seed": 0})})
    keep = np.ones((2, len(_DIGITS.pool)), dtype=bool)
    drawn = [calibration_set(top, _DIGITS, keep, m, 50, "cpu") for m in range(2)]
    assert [len(c) for c in drawn] == [50, 50]
    assert torch.equal(drawn[1].images, calibration_set(zero, _DIGITS, keep, 0, 50, "cpu").images)


def test_a_models_calibration_and_weights_do_not_depend_on_the_models_quantized_with_it() -> None:
    # OBC asks for more images than a model may have members; every model of the task then calibrates
    # on the fewest members any of them has, so model 0 gets the same data, and weights, in any group.
    spec = load_task("digits-mlp")
    keep = np.zeros((3, len(_DIGITS.pool)), dtype=bool)
    for model, members in enumerate((40, 25, 60)):
        keep[model, torch.randperm(len(_DIGITS.pool), generator=torch.Generator().manual_seed(model))[:members]] = True
    assert calibration_count(keep, 50) == 25 and calibration_count(keep, 20) == 20
    cals = [calibration_set(spec, _DIGITS, keep, m, 50, "cpu") for m in range(3)]
    assert [len(c) for c in cals] == [25, 25, 25]
    models = [trained_like("mlp", {"hidden": [16]}) for _ in range(2)]
    with torch.no_grad():
        models[1][-1].weight.mul_(-1.5)
    obc = QUANTIZERS.get("obc")({"calibration": 50, "rounds": 1})
    plan = PrecisionPlan.parse("w2")
    alone = obc.quantize_many([copy.deepcopy(models[0])], cals[:1], plan)[0]
    grouped = QUANTIZERS.get("obc")({"calibration": 50, "rounds": 1}).quantize_many(copy.deepcopy(models), cals[:2], plan)[0]
    for (name, a), (_, b) in zip(alone.state_dict().items(), grouped.state_dict().items()):
        assert torch.equal(a, b), name


def test_calibration_sets_of_several_sizes_in_one_group_are_refused() -> None:
    models = [trained_like("mlp", {"hidden": [16]}) for _ in range(2)]
    with pytest.raises(BenchError, match=r"calibration sets of one size, got \[16, 32\]"):
        QUANTIZERS.get("gptq")({}).quantize_many(models, [calibration(32), calibration(16)], PrecisionPlan.parse("w4"))


def overflowing_calibration() -> Calibration:
    """Inputs around 1e20: finite in float32, but their Hessian (~1e40) overflows float32 on every IEEE machine."""
    base = calibration(32)
    return Calibration(base.raw, lambda raw: base.normalize(raw) * 1e20)


@pytest.mark.parametrize("method", ["obc", "gptq"])
def test_hessian_out_of_range_is_a_clear_error_and_float64_fixes_it(method: str) -> None:
    model = trained_like("mlp", {"hidden": [16]})
    config = {"obc": {"rounds": 1, "calibration": 32}, "gptq": {"sequential": False}}[method]
    plan = PrecisionPlan.parse("w2")
    with pytest.raises(BenchError, match=r"layer '1' \(256 inputs\) became numerically unstable \(the 256x256 "
                                         r"Hessian is not finite in torch.float32.*rel_damp > 0 or dtype float64"):
        QUANTIZERS.get(method)(config).quantize(copy.deepcopy(model), overflowing_calibration(), plan)
    quantized = QUANTIZERS.get(method)({**config, "dtype": "float64"}).quantize(model, overflowing_calibration(), plan)
    assert all(torch.isfinite(p).all() for p in quantized.parameters())
    assert all(a.passed for a in audit_model(quantized, plan))


def test_a_hessian_cholesky_refuses_takes_the_fallback_damping() -> None:
    # An indefinite H: its second pivot is 3.99 - 4 = -0.01, negative far beyond any rounding, so the
    # undamped Cholesky fails on every machine and the fallback damping (0.01 x mean diagonal) is used.
    # (An exactly singular [[4, 4], [4, 4]] is not such a case: MKL's AVX2 and SSE kernels factor it to
    # a last pivot of 7e-4 instead of 0, and succeed.)
    h = torch.tensor([[4.0, 4.0], [4.0, 3.99]])
    expected = torch.linalg.inv(h + 0.01 * torch.diag(h).mean() * torch.eye(2))
    torch.testing.assert_close(inverse_hessian(h, 0.01), expected, rtol=1e-4, atol=0)  # cond(H + damping) ~ 200
    w = torch.tensor([[0.3, -0.7], [1.1, 0.2]])
    for q in (obc_quantize(w, h, fit_grid(w, 3), parallel=2), gptq_quantize(w, h, fit_grid(w, 3), rel_damp=0.0)):
        assert torch.isfinite(q).all() and (distinct_per_row(q) <= 3).all()
    with pytest.raises(NumericalError, match="not positive definite even with damping"):
        inverse_hessian(-h, 0.01)


def test_an_exactly_singular_hessian_takes_the_fallback_damping_whatever_its_rounding_left() -> None:
    # H = [[1, 1], [1, 1 + d]] beside a 6x6 identity: the second column is the first up to d, and its pivot
    # is (1 + d) - 1 * 1 = d with no rounding at all (every operation on these numbers is exact), on any CPU.
    # d = 2 float32 eps is what rounding noise can leave of an exactly singular H: Cholesky succeeds, and
    # only the rank tolerance (8 columns x eps of the diagonal, 4 times d) sends H to the fallback damping.
    # With d = 2^-10 the column is its own and H is inverted undamped; so is any H the method has damped
    # already (GPTQ's rel_damp: positive definite by construction, never damped twice).
    eps = torch.finfo(torch.float32).eps
    for d, damped, expect_fallback in ((2 * eps, False, True), (2.0 ** -10, False, False), (2 * eps, True, False)):
        h = torch.eye(8)
        h[:2, :2] = torch.tensor([[1.0, 1.0], [1.0, 1.0 + d]])
        assert torch.linalg.cholesky_ex(h).info == 0
        h64 = h.double()
        if expect_fallback:
            h64 = h64 + 0.01 * torch.diag(h64).mean() * torch.eye(8, dtype=torch.float64)
        torch.testing.assert_close(inverse_hessian(h, 0.01, damped=damped).double(), torch.linalg.inv(h64),
                                   rtol=1e-3, atol=1e-3)


def test_a_rarely_active_input_is_not_taken_for_a_dependent_one() -> None:
    # A diagonal H whose second input is 1e-12 of the first: tiny against the largest diagonal, but all its
    # own (pivot = diagonal), so no damping: its inverse entry is 1e12. (A tolerance relative to the largest
    # diagonal would damp it; digits-mlp's second layer has such inputs.)
    h = torch.diag(torch.tensor([1.0, 1e-12]))
    torch.testing.assert_close(inverse_hessian(h, 0.01), torch.diag(torch.tensor([1.0, 1e12])), rtol=1e-5, atol=0)


# The architectures every built-in family reaches: a chain, residual blocks with shortcuts, dense blocks.
CURSOR_NETS = [("cnn", {"batchnorm": True, "hidden": 16}, 0.25), ("resnet18", {}, 0.0625),
               pytest.param("densenet121", {}, 0.0625, marks=pytest.mark.slow)]


@pytest.mark.parametrize("arch, options, width", CURSOR_NETS)
@pytest.mark.parametrize("blocks", [False, True])
def test_a_carried_forward_pass_captures_what_a_pass_from_the_images_captures(arch, options, width, blocks) -> None:
    from mia_ptq_bench.quantize.units import ForwardCursor, forward_plan

    model = trained_like(arch, options, width=width)
    units = block_units(model) if blocks else layer_units(model, followers=True)  # units ending in a ReLU too
    plan = forward_plan(model, units, blocks=blocks)
    assert plan is not None and sorted(plan.order) == list(range(len(units)))
    images = calibration(40).images
    cursor = ForwardCursor(model, plan, list(images.split(16)))  # 16, 16, 8: batches as capture splits them
    for u in plan.order:
        x = cursor.input_of(u)
        assert torch.equal(x, capture(model, units[u].first, images, "input", 16)), units[u].name
        with torch.no_grad():  # change the unit's weights before reading its output: the cursor must see them
            for name in units[u].layers.values():
                model.get_submodule(name).weight.mul_(0.5)
        assert torch.equal(cursor.output_of(u), capture(model, units[u].last, images, "output", 16)), units[u].name
    with pytest.raises(RuntimeError, match="already run past"):
        cursor.output_of(plan.order[0])


@pytest.mark.parametrize("method", ["adaround", "brecq"])
@pytest.mark.parametrize("inputs", ["quantized", "full_precision"])
def test_reconstruction_with_carried_passes_learns_what_it_learns_from_per_unit_passes(method: str, inputs: str) -> None:
    from unittest import mock

    model = trained_like("resnet18", width=0.0625)
    cals = [calibration(24, seed=s) for s in (0, 1)]
    models = [model, copy.deepcopy(model)]
    with torch.no_grad():
        for p in models[1].parameters():
            p.mul_(1.1)
    quantizer = QUANTIZERS.get(method)({"iters": 30, "inputs": inputs, "capture_batch": 16})
    plan = PrecisionPlan.parse("w2")
    from mia_ptq_bench.quantize import reconstruction

    with mock.patch.object(reconstruction, "ForwardCursor", wraps=reconstruction.ForwardCursor) as cursor:
        carried = quantizer.quantize_many([copy.deepcopy(m) for m in models], cals, plan)
    assert cursor.call_count == (2 if inputs == "full_precision" else 4)  # a small model's passes fit: carried
    with mock.patch("mia_ptq_bench.quantize.reconstruction.forward_plan", return_value=None):
        # a fresh quantizer: the first one would replay the units it has done (memo.py)
        rerun = QUANTIZERS.get(method)(quantizer.config).quantize_many([copy.deepcopy(m) for m in models], cals, plan)
    for a, b in zip(carried, rerun):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    rtn = QUANTIZERS.get("rtn")({"bn": quantizer.bn_policy}).quantize(copy.deepcopy(models[0]), cals[0], plan)
    assert any(not torch.equal(x, y) for x, y in zip(carried[0].state_dict().values(), rtn.state_dict().values()))


def test_a_cursor_measures_the_most_it_keeps_at_once() -> None:
    from mia_ptq_bench.quantize.units import carried_bytes, carry_fits, forward_plan

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    plan = forward_plan(model, layer_units(model, followers=True))
    # Between two nodes a paused cursor holds only what later nodes read: the input (4 floats), then the
    # Linear's output (8), then the ReLU's (8), then the logits (2). The peak is 8 floats, 32 bytes.
    assert carried_bytes(model, plan, torch.randn(1, 4)) == 32
    # A view or an in-place result shares its input's storage: counted once.
    inplace = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(8, 2)).eval()
    assert carried_bytes(inplace, forward_plan(inplace, layer_units(inplace, followers=True)), torch.randn(1, 4)) == 32
    # The example given as a slice of a larger batch (as the quantizers pass it) counts as one example.
    assert carried_bytes(model, plan, torch.randn(1000, 4)[:1]) == 32
    from unittest import mock

    with mock.patch("mia_ptq_bench.pool.train.device_memory", return_value=32 * 1000 * 3 / 0.25):
        assert carry_fits(model, plan, torch.randn(1, 4), examples=1000, cursors=3)
        assert not carry_fits(model, plan, torch.randn(1, 4), examples=1001, cursors=3)


@pytest.mark.parametrize("method", ["adaround", "gptq"])
def test_where_carried_passes_would_not_fit_in_memory_each_unit_is_captured_from_the_images(method: str) -> None:
    from unittest import mock

    from mia_ptq_bench.quantize.units import ForwardCursor

    model = trained_like("resnet18", width=0.0625)
    cal = calibration(24)
    config = {"adaround": {"iters": 30, "capture_batch": 16}, "gptq": {"batch_size": 16}}[method]
    quantizer = QUANTIZERS.get(method)(config)
    plan = PrecisionPlan.parse("w2")
    module = {"adaround": "reconstruction", "gptq": "second_order"}[method]
    with mock.patch(f"mia_ptq_bench.quantize.{module}.ForwardCursor", wraps=ForwardCursor) as cursor:
        carried = quantizer.quantize(copy.deepcopy(model), cal, plan)
    assert cursor.call_count > 0  # with this machine's memory the passes are carried
    with (mock.patch("mia_ptq_bench.pool.train.device_memory", return_value=1.0),
          mock.patch(f"mia_ptq_bench.quantize.{module}.ForwardCursor", side_effect=AssertionError("no cursor"))):
        rerun = QUANTIZERS.get(method)(config).quantize(copy.deepcopy(model), cal, plan)
    for (name, x), y in zip(carried.state_dict().items(), rerun.state_dict().values()):
        assert torch.equal(x, y), name


class _RegisteredOutOfOrder(nn.Module):
    """Registers a layer before the one that feeds it: registration order is not call order (the
    classifier is registered last, as models.structure requires)."""

    def __init__(self) -> None:
        super().__init__()
        self.second = nn.Linear(64, 32)
        self.first = nn.Linear(256, 64)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.second(torch.relu(self.first(x.flatten(1))))))


@pytest.mark.parametrize("method", ["adaround", "brecq", "gptq"])
def test_the_machines_memory_changes_no_result_even_where_call_order_is_not_registration_order(method: str) -> None:
    # The carried passes are used only where they fit in memory; the fallback must take the units in the
    # same order, or a machine with less memory would quantize a layer before the one feeding it.
    from unittest import mock

    torch.manual_seed(0)
    model = _RegisteredOutOfOrder().eval()
    cal = calibration(48)
    quantizer = QUANTIZERS.get(method)({"gptq": {}}.get(method, {"iters": 40}))
    plan = PrecisionPlan.parse("w2")
    carried = quantizer.quantize(copy.deepcopy(model), cal, plan)
    with mock.patch("mia_ptq_bench.pool.train.device_memory", return_value=1.0):
        fallback = QUANTIZERS.get(method)(quantizer.config).quantize(copy.deepcopy(model), cal, plan)
    for name in ("first.weight", "second.weight", "head.weight"):
        assert torch.equal(carried.state_dict()[name], fallback.state_dict()[name]), name
