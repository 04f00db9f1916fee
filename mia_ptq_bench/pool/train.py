"""Training the pool: one recipe, two executions that learn the same thing.

Every model's randomness (initialisation, the order it sees its members in, its
crops and flips) is drawn up front from a generator seeded by (training seed,
model index), into a ``Schedule``. The sequential trainer then runs one model at
a time; the stacked trainer runs a group of same-shaped, buffer-free models as
one vmapped model with stacked parameters. Both consume the same schedules, so
they differ only by floating-point summation order (the tests check this).

Each model takes the same number of steps of exactly ``batch_size`` members: an
epoch is ``ceil(pool_size * pkeep / batch_size)`` steps over a stream that
concatenates fresh permutations of the model's own members.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state

from ..data import ImageDataset
from ..data.augment import augment
from ..models import build_model
from ..spec.schema import TaskSpec


@dataclass(frozen=True)
class Speed:
    """How a trainer runs on an accelerator; none of it changes the recipe.

    ``amp``: bfloat16 autocast (CUDA only); ``channels_last``: NHWC memory layout for
    convolutions; ``compile``: torch.compile the model.
    """

    amp: bool = False
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def for_device(cls, device: torch.device) -> Speed:
        return cls(amp=True, channels_last=True) if device.type == "cuda" else cls()


@dataclass(frozen=True)
class Schedule:
    batches: torch.Tensor  # (steps, B) pool indices
    shifts: torch.Tensor  # (steps, B, 2) crop offsets in [0, 2 * padding]
    flips: torch.Tensor  # (steps, B) bool


def model_seed(base_seed: int, index: int) -> int:
    return (base_seed * 1_000_003 + index * 7919 + 17) % (2**63 - 1)


def steps_per_epoch(spec: TaskSpec, pool_size: int) -> int:
    expected_members = round(pool_size * spec.membership.pkeep)
    return max(1, math.ceil(expected_members / spec.training.batch_size))


def make_schedule(spec: TaskSpec, members: np.ndarray, pool_size: int, index: int) -> Schedule:
    recipe = spec.training
    generator = torch.Generator().manual_seed(model_seed(recipe.seed, index) + 1)
    steps = recipe.epochs * steps_per_epoch(spec, pool_size)
    needed = steps * recipe.batch_size
    members_t = torch.as_tensor(members, dtype=torch.long)
    stream, have = [], 0
    while have < needed:
        stream.append(members_t[torch.randperm(len(members_t), generator=generator)])
        have += len(members_t)
    batches = torch.cat(stream)[:needed].view(steps, recipe.batch_size)
    pad = recipe.augment.crop_padding
    shifts = torch.randint(0, 2 * pad + 1, (steps, recipe.batch_size, 2), generator=generator)
    flips = torch.rand(steps, recipe.batch_size, generator=generator) < 0.5
    if not recipe.augment.hflip:
        flips = torch.zeros_like(flips)
    return Schedule(batches, shifts, flips)


def init_model(spec: TaskSpec, dataset: ImageDataset, index: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_seed(spec.training.seed, index))
        return build_model(spec.model, dataset.input_shape, dataset.num_classes)


def learning_rate(spec: TaskSpec, step: int, per_epoch: int) -> float:
    recipe = spec.training
    if recipe.schedule == "constant":
        return recipe.lr
    epoch = step // per_epoch  # stepped once per epoch, like CosineAnnealingLR(T_max=epochs)
    return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / recipe.epochs))


def _batch(dataset: ImageDataset, schedule: Schedule, step: int, padding: int, device: torch.device):
    index = schedule.batches[step]
    images = dataset.pool.images[index.to(dataset.pool.images.device)].to(device, non_blocking=True)
    images = augment(images, schedule.shifts[step].to(device), schedule.flips[step].to(device), padding)
    labels = dataset.pool.labels[index.to(dataset.pool.labels.device)].to(device, non_blocking=True)
    return dataset.normalize(images), labels


def on_device(schedule: Schedule, device: torch.device) -> Schedule:
    """Move a whole schedule to the device once, so the training loop never copies from the host."""
    return Schedule(schedule.batches.to(device), schedule.shifts.to(device), schedule.flips.to(device))


def _optimizer(spec: TaskSpec, params) -> torch.optim.SGD:
    recipe = spec.training
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def train_sequential(spec: TaskSpec, dataset: ImageDataset, model: nn.Module, schedule: Schedule,
                     device: torch.device, speed: Speed = Speed()) -> nn.Module:
    layout = torch.channels_last if speed.channels_last else torch.contiguous_format
    model.to(device, memory_format=layout).train()
    forward = torch.compile(model) if speed.compile else model
    optimizer = _optimizer(spec, model.parameters())
    per_epoch = steps_per_epoch(spec, len(dataset.pool))
    padding = spec.training.augment.crop_padding
    schedule = on_device(schedule, device)
    autocast = speed.amp and device.type == "cuda"
    for step in range(schedule.batches.shape[0]):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(spec, step, per_epoch)  # a Python float: no device sync
        images, labels = _batch(dataset, schedule, step, padding, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(forward(images.contiguous(memory_format=layout)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.to(memory_format=torch.contiguous_format).eval()


def can_stack(model: nn.Module) -> bool:
    """Stacked (vmapped) training needs stateless layers: no BatchNorm running statistics."""
    return not any(True for _ in model.buffers())


def train_stacked(spec: TaskSpec, dataset: ImageDataset, models: list[nn.Module], schedules: list[Schedule],
                  device: torch.device) -> list[nn.Module]:
    """Train same-architecture, buffer-free models as one: stacked parameters, vmapped forward.

    SGD (momentum, weight decay) acts elementwise and the summed loss gives each
    model its own gradient, so this equals training them one by one.
    """
    params, _ = stack_module_state([m.to(device) for m in models])
    params = {name: p.detach().requires_grad_() for name, p in params.items()}
    template = models[0]

    def forward(weights: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        return functional_call(template, weights, (images,))

    batched_forward = torch.vmap(forward)
    optimizer = _optimizer(spec, list(params.values()))
    per_epoch = steps_per_epoch(spec, len(dataset.pool))
    padding = spec.training.augment.crop_padding
    classes = dataset.num_classes
    for step in range(schedules[0].batches.shape[0]):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(spec, step, per_epoch)
        batches = [_batch(dataset, s, step, padding, device) for s in schedules]
        images = torch.stack([b[0] for b in batches])
        labels = torch.stack([b[1] for b in batches])
        logits = batched_forward(params, images)
        # Mean over each model's batch, summed over models: each model gets exactly its own gradient.
        loss = F.cross_entropy(logits.reshape(-1, classes), labels.reshape(-1), reduction="sum") / labels.shape[1]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    trained = []
    for i, model in enumerate(models):
        model.load_state_dict({name: p[i].detach() for name, p in params.items()})
        trained.append(model.eval())
    return trained
