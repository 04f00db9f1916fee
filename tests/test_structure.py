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
from mia_ptq_bench.quantize import QUANTIZERS, Calibration, audit_model
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
        head = self.head
        del self.head
        self.square = nn.Conv2d(4, 4, 1)
        self.head = head  # the classifier registered last again

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


class HeadReusedFunctionally(Body):
    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(10, 10)

    def forward(self, x):
        return F.linear(self.out(self.head(self.features(x))), self.out.weight.t())  # called once, used twice


class FlatMatrix(Body):
    def __init__(self) -> None:
        super().__init__()
        self.flat = nn.Parameter(torch.randn(10 * 10))

    def forward(self, x):
        return self.head(self.features(x)) @ self.flat.view(10, 10)


class StandardisedConv(nn.Conv2d):
    def forward(self, x):
        weight = (self.weight - self.weight.mean()) / self.weight.std()
        return self._conv_forward(x, weight, self.bias)


class TransformsItsWeight(Body):
    def __init__(self) -> None:
        super().__init__()
        self.conv = StandardisedConv(1, 4, 3, padding=1)


class Embedded(Body):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(1, 4 * 64)

    def forward(self, x):
        return self.head(self.features(x) + self.table(torch.zeros(x.shape[0], dtype=torch.long)))


def _weight_normed() -> nn.Module:
    model = Body()
    model.conv = nn.utils.parametrizations.weight_norm(model.conv)
    return model


REFUSED = [(Attention, r"parameter 'attend.in_proj_weight' \(12, 4\) is multiplied as a matrix \(by "
                       r"multi_head_attention_forward\) outside any Conv2d or Linear"),
           (BareMatrix, r"parameter 'project' \(256, 256\) is multiplied as a matrix \(by \w*matmul\)"),
           (FlatMatrix, r"parameter 'flat' \(100,\) is multiplied as a matrix"),
           (Embedded, r"parameter 'table.weight' \(1, 256\) is multiplied as a matrix \(by embedding\)"),
           (WeightUsedDirectly, r"the weight of layer 'head' is used outside the layer's own call \(by linear\)"),
           (HeadReusedFunctionally, r"the weight of layer 'out' is used outside the layer's own call"),
           (UnusedLayer, r"layer 'aux' is never called"),
           (TransformsItsWeight, r"layer 'conv' multiplies by something other than its weight parameter"),
           (_weight_normed, r"layer 'conv' multiplies by something other than its weight parameter"),
           (TiedLayers, r"layers 'mix' and 'again' share one parameter \(mix.weight is again.weight\)"),
           (HeadRegisteredFirst, r"the last layer registered, 'conv', is not the last one called \('head'\)")]


@pytest.mark.parametrize("network, message", REFUSED, ids=[n.__name__ for n, _ in REFUSED])
def test_a_network_the_quantizers_would_handle_wrongly_is_refused_with_the_layer_named(network, message) -> None:
    torch.manual_seed(0)
    model = network()
    model(EXAMPLE)  # valid PyTorch: it runs
    with pytest.raises(SpecError, match=message):
        check_quantizable(model, EXAMPLE)


@pytest.mark.parametrize("network, name", [(LayerCalledTwice, "square"), (NormCalledTwice, "bn")])
def test_a_layer_called_twice_is_refused_only_where_a_method_needs_one_call(network, name) -> None:
    torch.manual_seed(0)
    check_quantizable(network(), EXAMPLE)  # OBC, GPTQ and RTN sum or ignore the calls
    with pytest.raises(SpecError, match=f"'{name}' is called 2 times in one forward pass; this method needs"):
        check_quantizable(network(), EXAMPLE, once=True)


class TwiceWithoutNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.head = nn.Linear(64, 10)

    def forward(self, x):  # the same convolution on the image and on its mirror, averaged
        return self.head(((self.conv(x) + self.conv(x.flip(3)).flip(3)) / 2).flatten(1))


def test_methods_that_sum_repeated_calls_take_them_under_the_default_bn_policy_where_nothing_folds() -> None:
    calibration = Calibration(torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8), lambda raw: raw.float() / 255)
    plan = PrecisionPlan.parse("w4")
    for method in ("rtn", "gptq", "obc"):  # their default bn is fold; this model has no BatchNorm
        config = {"calibration": 8} if method == "obc" else {}
        QUANTIZERS.get(method)(config).quantize(TwiceWithoutNorm().eval(), calibration, plan)
    with pytest.raises(SpecError, match="'conv' is called 2 times"):
        QUANTIZERS.get("adaround")({"iters": 2}).quantize(TwiceWithoutNorm().eval(), calibration, plan)


class PerChannelExtras(Body):
    """Parameters of several dimensions that scale or shift, never multiply as matrices: accepted."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm([4, 8, 8])
        self.layer_scale = nn.Parameter(torch.ones(4, 1, 1))
        self.position = nn.Parameter(torch.zeros(1, 4, 8, 8))

    def forward(self, x):
        x = self.norm(self.conv(x) + self.position) * self.layer_scale
        return self.head(F.relu(self.bn(x)).flatten(1))


def test_per_channel_scales_and_offsets_of_any_shape_are_not_weight_matrices() -> None:
    model = PerChannelExtras()
    check_quantizable(model, EXAMPLE)
    calibration = Calibration(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8), lambda raw: raw.float() / 255)
    quantized = QUANTIZERS.get("gptq")({}).quantize(model.eval(), calibration, PrecisionPlan.parse("w4"))
    assert torch.isfinite(quantized(EXAMPLE)).all()


def test_the_probe_leaves_every_modules_mode_and_the_random_state_as_they_were() -> None:
    model = Body().train()
    model.bn.eval()  # a frozen BatchNorm inside a model in training
    state = torch.random.get_rng_state()
    call_order(model, EXAMPLE)
    assert model.training and model.conv.training and not model.bn.training
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("method", ["rtn", "gptq", "adaround"])
def test_every_calibrated_quantizer_refuses_it_before_touching_a_weight(method: str) -> None:
    assert QUANTIZERS.get("adaround").single_calls and not QUANTIZERS.get("obc").single_calls
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


def test_a_batch_of_one_that_a_batchnorm_cannot_train_on_is_refused_before_any_training(tiny_task,
                                                                                        tmp_path: Path) -> None:
    # ResNet10 on 8x8 images ends on a 1x1 map: its last BatchNorm would see one value per channel.
    one = tiny_task.training.model_copy(update={"batch_size": 1})
    spec = tiny_task.model_copy(update={"model": ModelSpec(arch="resnet10", width=0.125), "training": one})
    message = r"^training\.batch_size: 1: resnet10 cannot train on batches of 1 \(Expected more than 1 value .*use 2 or more$"
    with pytest.raises(SpecError, match=message):
        measure_model(spec, (1, 8, 8), 10)  # what validate and evaluate run first, on the meta device
    with pytest.raises(SpecError, match=message):
        build_pool(spec, load_dataset(spec.dataset), tmp_path)
    assert not any(tmp_path.iterdir())
    # a batch of two trains, and a model without BatchNorm trains on batches of one
    measure_model(spec.model_copy(update={"training": tiny_task.training.model_copy(update={"batch_size": 2})}),
                  (1, 8, 8), 10)
    measure_model(tiny_task.model_copy(update={"training": one}), (1, 8, 8), 10)


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


def test_adaround_quantizes_a_model_that_does_not_trace() -> None:
    # Its units are the layers alone (version 4): no graph needed to find what follows them.
    plan = PrecisionPlan.parse("w2")
    quantized = QUANTIZERS.get("adaround")({"iters": 20}).quantize(Untraceable(True).eval(), _digits_like(), plan)
    assert all(a.passed for a in audit_model(quantized, plan))


@pytest.mark.parametrize("method, config, needed", [("brecq", {}, "finding the BatchNorm and ReLU"),
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
