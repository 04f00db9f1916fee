from __future__ import annotations

import pytest
import torch
import torchvision

from mia_ptq_bench.models import MODELS, build_model, quantizable_layers
from mia_ptq_bench.spec.schema import ModelSpec


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet18", "resnet50", "densenet121"])
def test_every_model_runs_small(arch: str) -> None:
    model = build_model(ModelSpec(arch=arch, width=0.125), (3, 16, 16), 7)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    layers = quantizable_layers(model)
    assert isinstance(layers[-1][1], torch.nn.Linear) and layers[-1][1].out_features == 7


def torchvision_resnet18_cifar(num_classes: int, narrow: int = 1) -> torch.nn.Module:
    """torchvision's resnet18 with the CIFAR stem; ``narrow`` > 1 divides every channel count but the input's.

    Built on the meta device (no weights allocated); narrowed modules replace torchvision's one for one, so
    the network keeps torchvision's blocks and forward.
    """
    with torch.device("meta"):
        tv = torchvision.models.resnet18(num_classes=num_classes)
    tv.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False, device="meta")
    tv.maxpool = torch.nn.Identity()
    if narrow == 1:
        return tv
    for name, module in list(tv.named_modules()):
        parent = tv.get_submodule(name.rpartition(".")[0]) if "." in name else tv
        child = name.rpartition(".")[2]
        if isinstance(module, torch.nn.Conv2d):
            setattr(parent, child, torch.nn.Conv2d(
                module.in_channels if module.in_channels == 3 else module.in_channels // narrow,
                module.out_channels // narrow, module.kernel_size, module.stride, module.padding, bias=False))
        elif isinstance(module, torch.nn.BatchNorm2d):
            setattr(parent, child, torch.nn.BatchNorm2d(module.num_features // narrow))
        elif isinstance(module, torch.nn.Linear):
            setattr(parent, child, torch.nn.Linear(module.in_features // narrow, module.out_features))
    return tv


def test_resnet18_matches_torchvision_with_cifar_stem() -> None:
    # At full width, every parameter and buffer has torchvision's name and shape (on the meta device: 11M
    # parameters, none allocated)...
    with torch.device("meta"):
        full = build_model(ModelSpec(arch="resnet18"), (3, 16, 16), 10)
    assert all(p.is_meta for p in full.parameters())
    assert {k: v.shape for k, v in full.state_dict().items()} == {
        k: v.shape for k, v in torchvision_resnet18_cifar(10).state_dict().items()}
    # ...and at width 1/8, on 16px images, torchvision's forward on our weights gives our outputs.
    torch.manual_seed(0)
    ours = build_model(ModelSpec(arch="resnet18", width=0.125), (3, 16, 16), 10)
    for module in ours.modules():  # BatchNorm away from the identity, so a misplaced one shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    tv = torchvision_resnet18_cifar(10, narrow=8)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in tv.state_dict().items()}
    tv.load_state_dict(ours.state_dict())
    ours.eval(), tv.eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(ours(x), tv(x))


def test_cifar_stem_keeps_resolution() -> None:
    model = build_model(ModelSpec(arch="resnet18", width=0.125), (3, 16, 16), 10)
    assert model.conv1.stride == (1, 1) and model.conv1.kernel_size == (3, 3)
    assert model.conv1(torch.zeros(1, 3, 16, 16)).shape[-2:] == (16, 16)
    dense = build_model(ModelSpec(arch="densenet121", width=0.125), (3, 16, 16), 10)
    assert dense.features.conv0.stride == (1, 1) and isinstance(dense.features.pool0, torch.nn.Identity)
    assert dense.features.pool0(dense.features.conv0(torch.zeros(1, 3, 16, 16))).shape[-2:] == (16, 16)


def test_width_scales_channels() -> None:
    narrow = build_model(ModelSpec(arch="resnet18", width=0.125), (3, 16, 16), 10)
    assert narrow.conv1.out_channels == 8 and narrow.fc.in_features == 64


def test_bad_options_are_a_spec_error() -> None:
    from mia_ptq_bench.errors import SpecError

    with pytest.raises(SpecError, match="model.options"):
        build_model(ModelSpec(arch="resnet18", options={"depth": 3}), (3, 16, 16), 10)


def test_registry_lists_builtins() -> None:
    assert {"mlp", "cnn", "resnet18", "resnet50", "densenet121"} <= set(MODELS)
