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


def test_resnet18_matches_torchvision_with_cifar_stem() -> None:
    ours = build_model(ModelSpec(arch="resnet18"), (3, 32, 32), 10)
    tv = torchvision.models.resnet18(num_classes=10)
    tv.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    tv.maxpool = torch.nn.Identity()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in tv.state_dict().items()}
    tv.load_state_dict(ours.state_dict())
    ours.eval(), tv.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), tv(x))


def test_cifar_stem_keeps_resolution() -> None:
    model = build_model(ModelSpec(arch="resnet18", width=0.125), (3, 32, 32), 10)
    assert model.conv1.stride == (1, 1) and model.conv1.kernel_size == (3, 3)
    dense = build_model(ModelSpec(arch="densenet121", width=0.125), (3, 32, 32), 10)
    assert dense.features.conv0.stride == (1, 1) and isinstance(dense.features.pool0, torch.nn.Identity)


def test_width_scales_channels() -> None:
    narrow = build_model(ModelSpec(arch="resnet18", width=0.125), (3, 16, 16), 10)
    assert narrow.conv1.out_channels == 8 and narrow.fc.in_features == 64


def test_bad_options_are_a_spec_error() -> None:
    from mia_ptq_bench.errors import SpecError

    with pytest.raises(SpecError, match="model.options"):
        build_model(ModelSpec(arch="resnet18", options={"depth": 3}), (3, 16, 16), 10)


def test_registry_lists_builtins() -> None:
    assert {"mlp", "cnn", "resnet18", "resnet50", "densenet121"} <= set(MODELS)
