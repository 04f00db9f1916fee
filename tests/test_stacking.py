"""Stacked training (G models as one wide network) against training each model alone.

Equality tests run in float64: there, the two executions differ by ~1e-15 after tens of steps,
so a 1e-9 tolerance is decided by no machine's rounding, while two different pool models
differ by order 1 and a mix-up between models cannot pass. (In float32 a BatchNorm channel
that is nearly constant over a batch of 16px digits turns rounding into 1e-3 differences
within a few steps, for one-at-a-time training against itself in another memory layout too.)
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn

from mia_ptq_bench.data import ImageDataset, Split, load_dataset
from mia_ptq_bench.data.base import channel_stats
from mia_ptq_bench.pool import pool_keep_masks
from mia_ptq_bench.pool.train import (Schedule, _batch, _padded_pool, init_model, make_schedule, stack_schedules,
                                      stack_size, train_sequential, train_stacked)
from mia_ptq_bench.pool.wide import (FlattenedStackedLinear, NotStackable, PooledConv2d, StackedLinear, stack_states,
                                     unstack_state, widen)
from mia_ptq_bench.inference import accuracy
from mia_ptq_bench.spec import load_task

CPU = torch.device("cpu")
TOLERANCE = dict(rtol=1e-9, atol=1e-9)  # float64: observed differences are ~1e-15


class Float64(ImageDataset):
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return super().normalize(images).double()


def small_task(arch: str, epochs: int = 2, lr: float = 0.05):
    """16px digits, 300 pool images: a width-8 BatchNorm CNN, the same CNN without BatchNorm (its convolutions
    have biases: fashion-mnist-cnn's kind), or ResNet18."""
    spec = load_task("tiny-cnn")
    model = {"cnn": dict(arch="cnn", width=0.25, options={"batchnorm": True, "hidden": 128}),
             "plain-cnn": dict(arch="cnn", width=0.25, options={"hidden": 128}),
             "resnet": dict(arch="resnet18", width=0.125, options={})}[arch]
    return spec.model_copy(update={"model": spec.model.model_copy(update=model),
                                   "training": spec.training.model_copy(update={"epochs": epochs, "lr": lr})})


def float64(data: ImageDataset) -> Float64:
    return Float64(**{field.name: getattr(data, field.name) for field in dataclasses.fields(data)})


def schedules(spec, data: ImageDataset, indices: list[int], steps: int | None = None) -> list[Schedule]:
    keep = pool_keep_masks(spec, len(data.pool))
    out = [make_schedule(spec, np.flatnonzero(keep[i]), len(data.pool), i) for i in indices]
    return [Schedule(s.batches[:steps], s.shifts[:steps], s.flips[:steps]) for s in out]


def models(spec, data: ImageDataset, indices: list[int], dtype=torch.float32) -> list[nn.Module]:
    return [init_model(spec, data, i).to(dtype) for i in indices]


@pytest.mark.parametrize("arch", ["cnn", "plain-cnn", "resnet"])
def test_wide_network_is_the_models_side_by_side(arch: str) -> None:
    spec = small_task(arch)
    data = load_dataset(spec.dataset)
    group = models(spec, data, [0, 1, 2])
    wide = widen(group, data.input_shape).eval()
    x = torch.randn(4, 3, *data.input_shape)
    together = wide(x.flatten(1, 2)).view(4, 3, -1)
    for i, model in enumerate(group):
        torch.testing.assert_close(together[:, i], model.eval()(x[:, i]), rtol=1e-4, atol=1e-5)
        for (name, value), back in zip(model.state_dict().items(), unstack_state(wide, 3, i).values(), strict=True):
            assert torch.equal(value, back), name


def test_layers_that_mix_channels_are_refused_and_train_vmapped() -> None:
    class Mixing(nn.Module):  # the concatenation puts every model's first half before any second half
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            x = self.bn(torch.cat([self.a(x), self.b(x)], 1))
            return self.fc(x.relu().mean((2, 3)))

    spec = small_task("cnn")
    data = float64(load_dataset(spec.dataset))
    torch.manual_seed(0)
    group = [Mixing().double() for _ in range(3)]
    with pytest.raises(NotStackable, match="mix"):
        widen(group, data.input_shape)
    plans = schedules(spec, data, [0, 1, 2], steps=3)
    fresh = [Mixing().double() for _ in range(3)]
    for model, original in zip(fresh, group):
        model.load_state_dict(original.state_dict())
    alone = [train_sequential(spec, data, m, s, CPU) for m, s in zip(fresh, plans)]
    stacked = train_stacked(spec, data, group, plans, CPU)
    for a, b in zip(alone, stacked, strict=True):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            torch.testing.assert_close(p, q, **TOLERANCE, msg=name)


def test_densenet_is_refused_by_the_wide_network() -> None:
    spec = small_task("cnn")
    data = load_dataset(spec.dataset)
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"arch": "densenet121", "width": 0.125,
                                                                             "options": {}})})
    with pytest.raises(NotStackable):
        widen(models(spec, data, [0, 1]), data.input_shape)


@pytest.mark.parametrize("arch", ["cnn", "plain-cnn", "resnet"])
def test_stacked_equals_sequential_weights_and_batchnorm_statistics(arch: str) -> None:
    spec = small_task(arch)
    data = float64(load_dataset(spec.dataset))
    indices = [0, 1, 2]
    plans = schedules(spec, data, indices, steps=5)
    alone = [train_sequential(spec, data, m, s, CPU) for m, s in zip(models(spec, data, indices, torch.float64), plans)]
    stacked = train_stacked(spec, data, models(spec, data, indices, torch.float64), plans, CPU)
    untrained = init_model(spec, data, 0).state_dict()
    running = [name for name in untrained if name.endswith(("running_mean", "running_var"))]
    assert len(running) >= 4 if arch != "plain-cnn" else not running
    for a, b in zip(alone, stacked, strict=True):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            torch.testing.assert_close(q, p, **TOLERANCE, msg=name)
    # Different models really are different, by far more than the tolerance, BatchNorm statistics included.
    for name in running + [next(iter(untrained))]:
        a, b = stacked[0].state_dict()[name], stacked[1].state_dict()[name]
        assert (a - b).abs().max() > 1e-3, name
        assert (stacked[0].state_dict()[name] - untrained[name]).abs().max() > 1e-3, name


def three_channels(data: ImageDataset) -> Float64:
    """The digits as 3-channel images whose channels differ (the image, its negative, its half), with their
    own per-channel statistics: a CIFAR-like input, in float64."""
    def rgb(split: Split) -> Split:
        x = split.images
        return Split(torch.cat([x, 255 - x, x // 2], dim=1), split.labels)

    pool, test = rgb(data.pool), rgb(data.test)
    mean, std = channel_stats(pool.images)
    return Float64(data.name, pool, test, data.num_classes, mean, std)


@pytest.mark.parametrize("arch", ["cnn", "plain-cnn"])
def test_stacked_equals_sequential_on_three_channels(arch: str) -> None:
    """Each model normalises its own channels with the dataset's per-channel statistics, side by side."""
    spec = small_task(arch)
    data = three_channels(load_dataset(spec.dataset))
    assert data.input_shape[0] == 3 and len(set(data.mean)) == 3
    indices = [0, 1]
    plans = schedules(spec, data, indices, steps=4)
    alone = [train_sequential(spec, data, m, s, CPU) for m, s in zip(models(spec, data, indices, torch.float64), plans)]
    stacked = train_stacked(spec, data, models(spec, data, indices, torch.float64), plans, CPU)
    for a, b in zip(alone, stacked, strict=True):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            torch.testing.assert_close(q, p, **TOLERANCE, msg=name)
    first = next(iter(stacked[0].state_dict()))
    assert (stacked[0].state_dict()[first] - stacked[1].state_dict()[first]).abs().max() > 1e-3


def test_a_batch_comes_in_the_layout_its_trainer_expects() -> None:
    """One at a time: plain contiguous (B, C, H, W), as the models were always trained (the layout picks the
    convolution kernels, so it decides the bits). Stacked: the wide input, model g's images in channel block
    g, channels_last, each normalised with its own channels' statistics."""
    spec = small_task("cnn")
    for data in (load_dataset(spec.dataset), three_channels(load_dataset(spec.dataset))):
        channels, group, batch = data.input_shape[0], 3, spec.training.batch_size
        plans = schedules(spec, data, [0, 1, 2])
        padded = _padded_pool(data, spec.training.augment.crop_padding)
        one = [_batch(data, padded, plan, 0, CPU) for plan in plans]
        for images, _ in one:
            assert images.shape == (batch, *data.input_shape)
            assert images.stride() == torch.empty(images.shape).stride()  # not merely is_contiguous()
        wide, labels = _batch(data, padded, stack_schedules(plans), 0, CPU, group)
        assert wide.shape == (batch, group * channels, *data.input_shape[1:])
        assert wide.is_contiguous(memory_format=torch.channels_last)
        for g, (images, own_labels) in enumerate(one):
            assert torch.equal(wide[:, g * channels:(g + 1) * channels], images)
            assert torch.equal(labels.view(batch, group)[:, g], own_labels)


@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_a_model_never_sees_its_non_members(arch: str) -> None:
    """Poison every image model 0 does not train on: model 0 is unchanged, the others are not."""
    spec = small_task(arch, epochs=1)
    data = load_dataset(spec.dataset)
    keep = pool_keep_masks(spec, len(data.pool))
    outsiders = torch.from_numpy(~keep[0])
    generator = torch.Generator().manual_seed(1)
    images = data.pool.images.clone()
    images[outsiders] = torch.randint(0, 256, images[outsiders].shape, generator=generator, dtype=torch.uint8)
    labels = torch.where(outsiders, (data.pool.labels + 1) % data.num_classes, data.pool.labels)
    poisoned = dataclasses.replace(data, pool=Split(images, labels))
    indices = [0, 1, 2]
    plans = schedules(spec, data, indices)
    clean = train_stacked(spec, data, models(spec, data, indices), plans, CPU)
    dirty = train_stacked(spec, poisoned, models(spec, data, indices), plans, CPU)
    for index, (a, b) in enumerate(zip(clean, dirty, strict=True)):
        gap = max(float((p - q).abs().max()) for p, q in zip(a.state_dict().values(), b.state_dict().values())
                  if p.is_floating_point())
        if index == 0:
            assert gap <= 1e-6  # nothing of the poison reached model 0
        else:
            assert gap > 1e-2  # models 1 and 2 trained on poisoned members


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["cnn", "resnet"])
def test_stacked_learns_as_well_as_sequential(arch: str) -> None:
    """Float32, the real path: after training, the same test accuracy up to noise.

    In float32 the two executions drift apart (see the module docstring), so the models end
    up as different as two training runs; the bound is several standard deviations of that
    drift over 3 models x 400 test images, and far below what a broken trainer loses (it would
    sit near the 10% of chance). Digits are not flipped here: flips cost 16px digits most of
    their accuracy, and the equality tests above cover them.
    """
    spec = small_task(arch, epochs=6)
    spec = spec.model_copy(update={
        "dataset": spec.dataset.model_copy(update={"pool_size": 600, "test_size": 400}),
        "training": spec.training.model_copy(update={
            "batch_size": 16, "augment": spec.training.augment.model_copy(update={"hflip": False})})})
    data = load_dataset(spec.dataset)
    indices = [0, 1, 2]
    plans = schedules(spec, data, indices)
    alone = [accuracy(train_sequential(spec, data, m, s, CPU), data, data.test)
             for m, s in zip(models(spec, data, indices), plans)]
    stacked = [accuracy(m, data, data.test) for m in train_stacked(spec, data, models(spec, data, indices), plans, CPU)]
    assert min(np.mean(alone), np.mean(stacked)) > 0.6  # both learn (10% is chance)
    assert abs(np.mean(alone) - np.mean(stacked)) < 0.08


def test_stack_states_round_trip() -> None:
    spec = small_task("resnet")
    data = load_dataset(spec.dataset)
    group = models(spec, data, [0, 1])
    wide = widen(group, data.input_shape)
    state = stack_states(group, wide)
    assert state["conv1.weight"].shape[0] == 2 * group[0].conv1.weight.shape[0]
    assert state["fc.weight"].shape == (2, *group[0].fc.weight.shape)


def test_stack_size_rule() -> None:
    mega = 1e6
    # a small model: stacked until a step's work is large enough
    small = stack_size(6.5 * mega, 64, bytes_per_model=20 * mega, memory=8e9, models=64)
    assert 2 <= small <= 64
    # a big model alone fills the CPU: no stacking
    assert stack_size(1.7e9, 128, bytes_per_model=2e9, memory=8e9, models=64) == 1
    # memory caps the group; never more models than the pool has; always at least one
    assert stack_size(6.5 * mega, 64, bytes_per_model=1e9, memory=4e9, models=64) <= 4
    assert stack_size(6.5 * mega, 64, bytes_per_model=20 * mega, memory=8e9, models=3) <= 3
    assert stack_size(6.5 * mega, 64, bytes_per_model=1e12, memory=8e9, models=64) == 1
    # ResNet18 at width 1/4 on 28px (171 MFLOP per image, batch 128): two at a time
    assert stack_size(171 * mega, 128, bytes_per_model=400 * mega, memory=24e9, models=64) == 2
    # smaller models stack at least as wide
    assert stack_size(1 * mega, 64, 20 * mega, 8e9, 64) >= stack_size(20 * mega, 64, 20 * mega, 8e9, 64)


def test_the_wide_network_pools_before_its_relu_and_computes_the_same_bits(monkeypatch) -> None:
    import mia_ptq_bench.pool.wide as wide_module

    spec = small_task("cnn")
    data = load_dataset(spec.dataset)
    group = models(spec, data, [0, 1])
    swapped = widen(group, data.input_shape).train()
    monkeypatch.setattr(wide_module, "_pool_before_relu", lambda network: None)
    plain = widen(group, data.input_shape).train()
    kinds = [type(m).__name__ for m in swapped if type(m) in (nn.ReLU, nn.MaxPool2d)]
    assert kinds[:4] == ["MaxPool2d", "ReLU", "MaxPool2d", "ReLU"]
    assert [type(m).__name__ for m in plain if type(m) in (nn.ReLU, nn.MaxPool2d)][:2] == ["ReLU", "MaxPool2d"]

    # Windows with no positive value, exact zeros and ties: where the two orders could differ, if at all.
    x = torch.randn(8, 2 * data.input_shape[0], *data.input_shape[1:], generator=torch.Generator().manual_seed(0))
    x[0] = -x[0].abs()
    x[1, :, ::2] = 0.0
    x[2] = x[2].round()
    outputs, grads = [], []
    for network in (swapped, plain):
        out = network(x.clone())
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append([p.grad.clone() for p in network.parameters()])
    assert torch.equal(outputs[0], outputs[1])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def _gradients_per_model(network: nn.Module, models: int) -> list[dict[str, torch.Tensor]]:
    """Each model's own parameter gradients, out of a wide network's (through its state mapping)."""
    as_gradients = copy.deepcopy(network)
    for p, q in zip(as_gradients.parameters(), network.parameters(), strict=True):
        p.data = q.grad.clone()
    parameters = {name for name, _ in as_gradients.named_parameters()}
    return [{name: value for name, value in unstack_state(as_gradients, models, i).items() if name in parameters}
            for i in range(models)]


def test_the_wide_network_reads_a_flattened_map_pixel_major_with_the_same_result(monkeypatch) -> None:
    import mia_ptq_bench.pool.wide as wide_module

    spec = small_task("cnn")
    # 6 channels of 4x4 pixels: unequal, so that reading the map channel-major cannot pass for pixel-major
    options = {**spec.model.options, "channels": [32, 24]}
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"options": options})})
    data = float64(load_dataset(spec.dataset))
    group = models(spec, data, [0, 1], dtype=torch.float64)
    folded = widen(group, data.input_shape).train()
    monkeypatch.setattr(wide_module, "_flatten_into_linear", lambda network, maps: None)
    plain = widen(group, data.input_shape).train()
    assert [type(m) for m in folded.modules()].count(FlattenedStackedLinear) == 1
    assert FlattenedStackedLinear not in [type(m) for m in plain.modules()]
    # stored pixel-major: the folded weight is not the plain one, but it maps back to each model's own
    weight = next(m for m in folded.modules() if type(m) is FlattenedStackedLinear).weight
    assert not torch.equal(weight, plain.get_submodule(str(len(plain) - 3)).weight)
    for i, model in enumerate(group):
        for (name, value), back in zip(model.state_dict().items(), unstack_state(folded, 2, i).values(), strict=True):
            assert torch.equal(value, back), name

    x = torch.randn(8, 2 * data.input_shape[0], *data.input_shape[1:], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    for layout in (torch.contiguous_format, torch.channels_last):
        outputs, gradients = [], []
        for network in (folded, plain):
            network.zero_grad(set_to_none=True)
            inputs = x.clone(memory_format=layout).requires_grad_()
            out = network.to(memory_format=layout)(inputs)
            out.square().sum().backward()
            assert inputs.grad is not None
            outputs.append((out.detach(), inputs.grad))
            gradients.append(_gradients_per_model(network, 2))
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
        for ours, theirs in zip(*gradients, strict=True):
            assert ours.keys() == theirs.keys()
            for name in ours:
                torch.testing.assert_close(ours[name], theirs[name], rtol=1e-12, atol=1e-12, msg=name)


def test_the_wide_network_adds_a_convolutions_bias_after_its_pool(monkeypatch) -> None:
    import mia_ptq_bench.pool.wide as wide_module

    spec = small_task("plain-cnn")
    data = float64(load_dataset(spec.dataset))
    group = models(spec, data, [0, 1], dtype=torch.float64)
    folded = widen(group, data.input_shape).train()
    monkeypatch.setattr(wide_module, "_bias_after_pool", lambda network: None)
    plain = widen(group, data.input_shape).train()
    assert [type(m) for m in folded.modules()].count(PooledConv2d) == 2
    assert PooledConv2d not in [type(m) for m in plain.modules()]
    assert folded.state_dict().keys() == plain.state_dict().keys()

    # Uniform images (every window a tie), whole numbers (many ties) and noise.
    x = torch.randn(6, 2 * data.input_shape[0], *data.input_shape[1:], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    x[0], x[1] = 0.7, x[1].round()
    outputs, gradients = [], []
    for network in (folded, plain):
        network.zero_grad(set_to_none=True)
        out = network(x)
        out.square().sum().backward()
        outputs.append(out.detach())
        gradients.append({name: p.grad for name, p in network.named_parameters()})
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradient, gradients[1][name], rtol=1e-12, atol=1e-12, msg=name)


def test_the_flatten_is_folded_only_where_the_two_orders_differ() -> None:
    """One channel (an MLP on 1-channel images) or one pixel (four stages on 16px): the plain layers stay,
    and with them the bits of the pools trained before the fold."""
    spec = small_task("cnn")
    data = load_dataset(spec.dataset)
    assert data.input_shape[0] == 1
    mlp = spec.model_copy(update={"model": spec.model.model_copy(update={"arch": "mlp", "options": {}})})
    one_pixel = spec.model_copy(update={"model": spec.model.model_copy(
        update={"options": {**spec.model.options, "channels": [8, 8, 8, 8]}})})
    for task in (mlp, one_pixel):
        kinds = [type(m) for m in widen(models(task, data, [0, 1]), data.input_shape).modules()]
        assert nn.Flatten in kinds and StackedLinear in kinds
        assert FlattenedStackedLinear not in kinds


def test_the_memory_probe_takes_batchnorm_on_a_one_pixel_map() -> None:
    from mia_ptq_bench.models import build_model
    from mia_ptq_bench.pool.train import training_bytes
    from mia_ptq_bench.spec.schema import ModelSpec

    # A width-1/8 ResNet18 on 8x8 images ends on a 1x1 map, where BatchNorm refuses a batch of one image.
    model = build_model(ModelSpec(arch="resnet18", width=0.125), (1, 8, 8), 10)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model.train()(torch.zeros(1, 1, 8, 8))
    per_step = training_bytes(model, (1, 8, 8), 16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert per_step > 4 * weights  # the activations of 16 images count, beside the weights
    assert training_bytes(model, (1, 8, 8), 32) - per_step == per_step - training_bytes(model, (1, 8, 8), 0)
