"""Networks that are valid PyTorch but break what the quantizers assume of their layers: one clear error."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mia_ptq_bench.budget import measure_model
from mia_ptq_bench.data import load_dataset
from mia_ptq_bench.errors import BenchError, SpecError
from mia_ptq_bench.models import MODELS, build_model
from mia_ptq_bench.models.structure import call_order, check_quantizable
from mia_ptq_bench.pool import build_pool
from mia_ptq_bench.quantize import QUANTIZERS, Calibration
from mia_ptq_bench.quantize.batchnorm import fold_batchnorm
from mia_ptq_bench.spec import PrecisionPlan
from mia_ptq_bench.spec.schema import ModelSpec

EXAMPLE = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Attention(Body):
    def __init__(self) -> None:
        super().__init__()
        self.attend = nn.MultiheadAttention(4, 1, batch_first=True)

    def forward(self, x):
        tokens = F.relu(self.bn(self.conv(x))).flatten(2).transpose(1, 2)
        return self.head(self.attend(tokens, tokens, tokens)[0].flatten(1))


class WeightUsedDirectly(Body):
    def forward(self, x):
        return F.linear(self.features(x), self.head.weight, self.head.bias)


class UnusedLayer(Body):
    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(4 * 64, 10)


class LayerCalledTwice(Body):
    def __init__(self) -> None:
        super().__init__()
        self.square = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.head(self.square(self.square(F.relu(self.bn(self.conv(x))))).flatten(1))


class NormCalledTwice(Body):
    def forward(self, x):
        return self.head(self.bn(F.relu(self.bn(self.conv(x)))).flatten(1))


class TiedLayers(Body):
    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Conv2d(4, 4, 1)
        self.again = nn.Conv2d(4, 4, 1)
        self.again.weight = self.mix.weight

    def forward(self, x):
        return self.head(self.again(F.relu(self.mix(F.relu(self.bn(self.conv(x)))))).flatten(1))


class HeadRegisteredFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4 * 64, 10)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        return self.head(F.relu(self.conv(x)).flatten(1))


class BareMatrix(Body):
    def __init__(self) -> None:
        super().__init__()
        self.project = nn.Parameter(torch.randn(4 * 64, 4 * 64))

    def forward(self, x):
        return self.head(self.features(x) @ self.project)


REFUSED = [(Attention, r"parameter 'attend.in_proj_weight' \(12, 4\) is a weight matrix outside"),
           (WeightUsedDirectly, r"layer 'head' is never called by the forward pass"),
           (UnusedLayer, r"layer 'aux' is never called"),
           (LayerCalledTwice, r"'square' is called 2 times in one forward pass"),
           (NormCalledTwice, r"'bn' is called 2 times"),
           (TiedLayers, r"layers 'mix' and 'again' share one parameter \(mix.weight is again.weight\)"),
           (HeadRegisteredFirst, r"the last layer registered, 'conv', is not the last one called \('head'\)"),
           (BareMatrix, r"parameter 'project' \(256, 256\) is a weight matrix outside")]


@pytest.mark.parametrize("network, message", REFUSED, ids=[n.__name__ for n, _ in REFUSED])
def test_a_network_the_quantizers_would_handle_wrongly_is_refused_with_the_layer_named(network, message) -> None:
    torch.manual_seed(0)
    model = network()
    model(EXAMPLE)  # valid PyTorch: it runs
    with pytest.raises(SpecError, match=message):
        check_quantizable(model, EXAMPLE)


@pytest.mark.parametrize("method", ["rtn", "gptq", "adaround"])
def test_every_calibrated_quantizer_refuses_it_before_touching_a_weight(method: str) -> None:
    torch.manual_seed(0)
    model = TiedLayers().eval()
    before = copy.deepcopy(model.state_dict())
    calibration = Calibration(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8), lambda raw: raw.float() / 255)
    with pytest.raises(SpecError, match="share one parameter"):
        QUANTIZERS.get(method)({}).quantize(model, calibration, PrecisionPlan.parse("w4"))
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


@pytest.mark.parametrize("arch, options, shape", [("mlp", {"hidden": [16]}, (1, 16, 16)),
                                                   ("cnn", {"batchnorm": True}, (1, 16, 16)),
                                                   ("resnet10", {}, (1, 16, 16)), ("resnet18", {}, (3, 16, 16)),
                                                   ("resnet50", {}, (3, 16, 16)), ("densenet121", {}, (3, 16, 16))])
def test_every_built_in_architecture_passes_and_calls_each_layer_once(arch, options, shape) -> None:
    model = build_model(ModelSpec(arch=arch, width=0.0625, options=options), shape, 10)
    example = torch.randn(2, *shape)
    check_quantizable(model, example)
    calls = call_order(model, example)
    assert set(calls.values()) == {1}
    assert model.training  # the probe leaves the model's mode as it found it


def test_a_task_with_such_an_architecture_is_refused_by_validate_and_before_any_training(tiny_task,
                                                                                       tmp_path: Path) -> None:
    if "test-tied" not in MODELS:
        MODELS.add("test-tied", lambda input_shape, num_classes, width=1.0: TiedLayers())
    spec = tiny_task.model_copy(update={"model": ModelSpec(arch="test-tied"),
                                        "dataset": tiny_task.dataset.model_copy(update={"image_size": 8})})
    with pytest.raises(SpecError, match="share one parameter"):
        measure_model(spec, (1, 8, 8), 10)  # what validate runs, on the meta device
    data = load_dataset(spec.dataset)
    with pytest.raises(SpecError, match="share one parameter"):
        build_pool(spec, data, tmp_path)
    assert not list(tmp_path.rglob("*.safetensors"))


class Untraceable(nn.Module):
    """Layers registered in another order than called, and a branch on a value, which fx cannot trace."""

    def __init__(self, call_order_registered: bool) -> None:
        super().__init__()
        names = ["a", "b"] if call_order_registered else ["b", "a"]
        for name in names:
            torch.manual_seed(ord(name))
            self.add_module(name, nn.Conv2d(1 if name == "a" else 4, 4, 3, padding=1))
        torch.manual_seed(0)
        self.head = nn.Linear(4 * 64, 10)

    def forward(self, x):
        x = F.relu(self.a(x))
        if bool(x.sum() >= 0):  # always true, but a traced Proxy cannot be branched on
            x = F.relu(self.b(x))
        return self.head(x.flatten(1))


def _digits_like(count: int = 32) -> Calibration:
    return Calibration(torch.randint(0, 256, (count, 1, 8, 8), dtype=torch.uint8,
                                     generator=torch.Generator().manual_seed(1)), lambda raw: raw.float() / 255)


def test_a_model_that_does_not_trace_is_quantized_in_the_order_its_layers_are_called() -> None:
    # Sequential GPTQ takes each layer's Hessian from the model quantized so far: registering 'b'
    # before 'a' must not let 'b' be quantized first, from the inputs of an unquantized 'a'.
    plan = PrecisionPlan.parse("w2")
    results = [QUANTIZERS.get("gptq")({"sequential": True}).quantize(Untraceable(registered).eval(), _digits_like(), plan)
               for registered in (True, False)]
    for name in ("a", "b", "head"):
        assert torch.equal(results[0].get_submodule(name).weight, results[1].get_submodule(name).weight), name


@pytest.mark.parametrize("method, config, needed", [("adaround", {}, "finding the BatchNorm and ReLU"),
                                                    ("brecq", {}, "finding the BatchNorm and ReLU"),
                                                    ("rtn", {"bn": "fold"}, r"folding BatchNorm \(bn: fold")])
def test_what_needs_the_graph_of_a_model_that_does_not_trace_is_one_clear_error(method, config, needed) -> None:
    model = Untraceable(True).eval()
    if method == "rtn":  # folding needs a BatchNorm to fold
        model.a = nn.Sequential(model.a, nn.BatchNorm2d(4)).eval()
    with pytest.raises(BenchError, match=f"does not trace with torch.fx .*, and {needed}"):
        QUANTIZERS.get(method)(config).quantize(model, _digits_like(), PrecisionPlan.parse("w4"))
    QUANTIZERS.get("rtn")({"bn": "keep"}).quantize(model, _digits_like(), PrecisionPlan.parse("w4"))  # needs no graph


def test_a_batchnorm_without_affine_parameters_folds_to_the_same_function() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False), nn.ReLU()).eval()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    expected = model(EXAMPLE)
    folded = fold_batchnorm(copy.deepcopy(model))
    assert isinstance(folded[1], nn.Identity)
    torch.testing.assert_close(folded(EXAMPLE), expected)


def test_a_batchnorm_without_running_statistics_cannot_be_folded_and_says_so() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(BenchError, match=r"BatchNorm '1' keeps no running statistics .*set bn: keep"):
        fold_batchnorm(model)
