"""AdaRound's reconstruction gradient from per-example moments (quantize/moments.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, stack_module_state

from mia_ptq_bench.quantize import rounding
from mia_ptq_bench.quantize.common import GridConfig
from mia_ptq_bench.quantize.moments import AffineUnit, MomentGradient
from mia_ptq_bench.quantize.rounding import RoundingSchedule, choose_way, learn_rounding, reconstruction_loss


def with_batchnorm(conv: nn.Conv2d, seed: int) -> nn.Sequential:
    """conv, then a BatchNorm in eval mode whose statistics and affine parameters do something."""
    bn = nn.BatchNorm2d(conv.out_channels, eps=1e-3)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(conv.out_channels, generator=generator))
        bn.running_var.copy_(torch.rand(conv.out_channels, generator=generator) + 0.5)
        bn.weight.copy_(torch.randn(conv.out_channels, generator=generator))
        bn.bias.copy_(torch.randn(conv.out_channels, generator=generator))
    return nn.Sequential(conv, bn, nn.Identity()).eval()


UNITS = {
    "conv, BatchNorm, Identity (strided, padded)": (
        lambda seed: with_batchnorm(nn.Conv2d(3, 5, 3, stride=2, padding=1), seed), (3, 9, 9)),
    "conv without bias, dilated, 'valid'": (
        lambda seed: nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2, bias=False, padding="valid")), (3, 9, 9)),
    "conv, BatchNorm without affine parameters, 3x2 kernel": (
        lambda seed: nn.Sequential(nn.Conv2d(3, 4, (3, 2), padding=(1, 0)), nn.BatchNorm2d(4, affine=False).eval()),
        (3, 7, 6)),
    "1x1 conv (a shortcut)": (lambda seed: with_batchnorm(nn.Conv2d(4, 6, 1, stride=2, bias=False), seed), (4, 8, 8)),
    "linear": (lambda seed: nn.Sequential(nn.Linear(7, 4)), (7,)),
}


@pytest.mark.parametrize("name", UNITS)
def test_the_moments_give_the_reconstruction_losss_gradient(name: str) -> None:
    build, shape = UNITS[name]
    torch.manual_seed(0)
    units = [build(seed).double() for seed in range(3)]
    params, buffers = stack_module_state(units)
    params = {k: p.detach() for k, p in params.items()}
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(150, 3, *shape, generator=generator, dtype=torch.float64)  # > a 128-example chunk
    with torch.no_grad():
        targets = torch.stack([u(inputs[:, m]) for m, u in enumerate(units)], 1)
        targets += 0.1 * torch.randn(targets.shape, generator=generator, dtype=torch.float64)
    affine = AffineUnit.of(units[0])
    assert affine is not None
    gradient = MomentGradient(affine, params, buffers, inputs, targets)
    index = torch.tensor([3, 1, 7, 7, 12, 140])  # a repeat counts twice, as in the gathered batch
    weight = (params["0.weight"] + 0.05).requires_grad_()  # off the weights the targets came from

    def forward(p, b, x):
        return functional_call(units[0], {**p, **b}, (x,))

    output = torch.vmap(forward, in_dims=(0, 0, 1), out_dims=1)({**params, "0.weight": weight}, buffers, inputs[index])
    reconstruction_loss(output, targets[index], 3 * targets.shape[2]).backward()
    torch.testing.assert_close(gradient(weight.detach(), index), weight.grad, rtol=1e-10, atol=1e-12)


class ReLUConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class MyBatchNorm(nn.BatchNorm2d):
    pass


class MyIdentity(nn.Identity):
    pass


class Residual(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


def test_only_one_layer_followed_by_eval_batchnorm_or_identity_is_affine() -> None:
    conv = nn.Conv2d(2, 4, 3)
    assert AffineUnit.of(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4).eval(), nn.Identity()))
    assert AffineUnit.of(nn.Sequential(nn.Linear(3, 2)))
    assert AffineUnit.of(nn.Sequential(nn.Conv2d(2, 4, 3, padding="valid")))
    hooked = nn.Sequential(nn.Conv2d(2, 4, 3))
    hooked[0].register_forward_hook(lambda module, args, output: output.relu())
    for unit in (nn.Sequential(ReLUConv(2, 4, 3)),  # only exact types: a subclass may compute anything
                 nn.Sequential(conv, MyBatchNorm(4).eval()),
                 nn.Sequential(conv, MyIdentity()),
                 Residual(nn.Conv2d(4, 4, 3, padding=1)),
                 hooked,
                 nn.Sequential(nn.Conv2d(2, 4, 3, padding="same")),
                 nn.Sequential(conv, nn.ReLU()),
                 nn.Sequential(conv, nn.BatchNorm2d(4).train()),
                 nn.Sequential(conv, nn.BatchNorm2d(4, track_running_stats=False).eval()),
                 nn.Sequential(conv, nn.BatchNorm2d(4).eval(), nn.BatchNorm2d(4).eval()),
                 nn.Sequential(nn.Conv2d(2, 4, 3, groups=2)),
                 nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")),
                 nn.Sequential(nn.Conv2d(2, 4, 3, padding="same")),
                 nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2).eval()),
                 nn.Sequential(),
                 conv):
        assert AffineUnit.of(unit) is None, unit


def reconstruction_problem(models: int, examples: int, channels: tuple[int, int], size: int, noise: float):
    """Units (conv + BatchNorm) of ``models`` models, model-major inputs and noisy targets, 4-level grids."""
    units = []
    for seed in range(models):
        torch.manual_seed(seed)  # the convolution's initial weights
        units.append(with_batchnorm(nn.Conv2d(*channels, 3, padding=1), seed))
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(models, examples, channels[0], size, size, generator=generator)
    with torch.no_grad():
        targets = torch.stack([u(x) + noise * torch.randn(u(x).shape, generator=generator) for u, x in zip(units, inputs)])
    grids = [{"0.weight": GridConfig().grid(u[0].weight.detach(), 4)} for u in units]
    return units, inputs, targets, grids


def test_steps_from_moments_learn_the_rounding_the_convolutions_learn() -> None:
    units, inputs, targets, grids = reconstruction_problem(3, 24, (3, 4), 8, 0.01)
    schedule = RoundingSchedule(60, 8, 1e-2, 0.01, 20.0, 2.0, 0.2, 0)
    with torch.enable_grad():
        learned = {way: learn_rounding(units, ["0.weight"], {"0.weight": 4}, grids, inputs.transpose(0, 1),
                                       targets.transpose(0, 1), schedule, way=way) for way in ("moments", "grouped")}
        with pytest.raises(ValueError, match="not one layer affine"):
            relu = [nn.Sequential(u[0], nn.ReLU()) for u in units]
            learn_rounding(relu, ["0.weight"], {"0.weight": 4}, grids, inputs.transpose(0, 1), targets.transpose(0, 1),
                           schedule, way="moments")
    for moments, grouped in zip(learned["moments"][0], learned["grouped"][0]):
        flips = (moments["0.weight"] != grouped["0.weight"]).float().mean()
        assert flips < 0.01  # the same optimisation: at most a float-rounding tie flips a weight
    assert learned["moments"][1] == pytest.approx(learned["grouped"][1], abs=0.01)
    # and the optimisation did move: the learned rounding is not round-to-nearest everywhere
    nearest = [torch.round(u[0].weight / g["0.weight"].scale.reshape(-1, 1, 1, 1)) for u, g in zip(units, grids)]
    assert any((m["0.weight"] / g["0.weight"].scale.reshape(-1, 1, 1, 1)).round().ne(n).any()
               for m, g, n in zip(learned["moments"][0], grids, nearest))


def test_the_moments_are_chosen_from_the_shapes_alone() -> None:
    cpu = torch.device("cpu")
    early = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8).eval())  # few channels, many positions
    late = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32).eval())  # many channels, few positions
    assert choose_way(early, 16, cpu, torch.Size([8, 28, 28])) == "moments"
    assert choose_way(late, 16, cpu, torch.Size([32, 4, 4])) == "grouped"
    assert choose_way(nn.Sequential(early[0], early[1], nn.ReLU()), 16, cpu, torch.Size([8, 28, 28])) == "grouped"
    assert choose_way(nn.Sequential(nn.Linear(64, 10)), 16, cpu, torch.Size([64])) == "vmap"
    assert choose_way(early, 16, cpu) == "grouped"  # no input shape: no moments (BRECQ)
    assert AffineUnit.of(early).table_bytes(1024, 16) == 1024 * 16 * 73 * 81 * 4


def test_models_whose_moments_do_not_fit_together_learn_in_groups_with_the_same_bits(monkeypatch) -> None:
    units, inputs, targets, grids = reconstruction_problem(5, 40, (2, 3), 6, 0.05)
    schedule = RoundingSchedule(40, 8, 1e-2, 0.01, 20.0, 2.0, 0.2, 0)

    def learn(per_table: int):
        table = AffineUnit.of(units[0]).table_bytes(40, per_table)
        monkeypatch.setattr(rounding, "memory_share", lambda device: table + 1)
        built = []
        monkeypatch.setattr(rounding, "MomentGradient",
                            lambda *args: built.append(args[-1].shape[1]) or MomentGradient(*args))
        with torch.enable_grad():
            result = learn_rounding(units, ["0.weight"], {"0.weight": 4}, grids, inputs.transpose(0, 1),
                                    targets.transpose(0, 1), schedule, way="moments")
        return result, built

    (together, decided), built = learn(5)
    assert built == [5]
    (grouped, grouped_decided), built = learn(2)
    assert built == [2, 2, 1]
    assert grouped_decided == decided
    for a, b in zip(grouped, together):
        assert torch.equal(a["0.weight"], b["0.weight"])
