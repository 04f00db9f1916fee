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

import copy
import itertools
import math
import os
import platform
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state
from torch.utils.flop_counter import FlopCounterMode

from ..data import ImageDataset
from ..data.augment import crop_and_flip
from ..errors import BenchError, SpecError
from ..models import MODELS, build_model
from ..spec.schema import TaskSpec
from .wide import NotStackable, unstack_state, widen


@dataclass(frozen=True)
class Speed:
    """How a trainer runs: the recipe is the same, but ``amp`` changes the arithmetic.

    ``amp``: bfloat16 autocast (convolutions and matmuls take bfloat16 inputs and accumulate in
    float32; weights, BatchNorm statistics and SGD stay float32). Models trained so differ from
    float32-trained ones by more than float rounding. ``channels_last``: NHWC memory layout for
    convolutions; ``compile``: torch.compile the model.
    """

    amp: bool = False
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def for_device(cls, device: torch.device, amp: bool | None = None) -> Speed:
        """The device's way to train. ``amp`` None: bfloat16 autocast on a GPU with native bfloat16, float32
        elsewhere (on a CPU, the study's arithmetic); True is refused where bfloat16 would be emulated, which
        would train slower than float32."""
        native = native_bfloat16(device)
        if amp and not native:
            if device.type == "cuda" and not torch.cuda.is_available():
                raise BenchError("amp=True (--amp): no CUDA GPU is available; leave it out")
            needs = "compute capability 8.0 or later" if device.type == "cuda" else "on x86, AVX512_BF16 or AMX"
            raise BenchError(f"amp=True (--amp): this {device.type} has no native bfloat16 arithmetic ({needs}), so "
                             "bfloat16 autocast would train slower than float32; leave it out")
        if device.type == "cuda":
            return cls(amp=native if amp is None else amp, channels_last=True)
        return cls(amp=bool(amp))


def native_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 convolutions and matmuls run natively (faster than float32) on ``device``.

    On x86 that takes AVX512_BF16 or AMX: oneDNN's own bfloat16 check accepts any AVX-512 CPU, and
    emulates bfloat16 on those without them."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        with torch.cuda.device(device):  # this GPU's, not the current one's
            return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


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
    if not len(members_t) and needed:  # the loop below would never end (pool_keep_masks refuses such a pool)
        raise ValueError(f"pool model {index} has no members to train on")
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


def _padded_pool(dataset: ImageDataset, padding: int) -> torch.Tensor:
    """The pool's raw images zero-padded once, for every step's crops to read from."""
    return F.pad(dataset.pool.images, (padding,) * 4) if padding else dataset.pool.images


def _batch(dataset: ImageDataset, padded: torch.Tensor, schedule: Schedule, step: int, device: torch.device,
           group: int | None = None):
    """A step's normalised images and labels: (B, C, H, W), or with ``group`` the wide network's input
    (B, group * C, H, W) in channels_last memory (see ``crop_and_flip``)."""
    index, where = schedule.batches[step], padded.device
    images = crop_and_flip(padded, index.to(where), schedule.shifts[step].to(where), schedule.flips[step].to(where),
                           dataset.input_shape[1:], group).to(device, non_blocking=True)
    labels = dataset.pool.labels[index.to(dataset.pool.labels.device)].to(device, non_blocking=True)
    if group is None:
        return dataset.normalize(images), labels
    # normalize() broadcasts a C-long mean over dim 1: hand it every model's pixel as a row of C channels
    batch, _, height, width = images.shape
    pixels = images.permute(0, 2, 3, 1).reshape(-1, dataset.input_shape[0], 1, 1)
    return dataset.normalize(pixels).view(batch, height, width, -1).permute(0, 3, 1, 2), labels


def on_device(schedule: Schedule, device: torch.device) -> Schedule:
    """Move a whole schedule to the device once, so the training loop never copies from the host."""
    return Schedule(schedule.batches.to(device), schedule.shifts.to(device), schedule.flips.to(device))


def _optimizer(spec: TaskSpec, params) -> torch.optim.SGD:
    recipe = spec.training
    # foreach: the same elementwise update per tensor, a few dispatches per step instead of a few per
    # tensor (1% of the stacked CNN's step on 2 CPU cores; the bits checked equal to the plain loop's)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                           foreach=True)


def train_sequential(spec: TaskSpec, dataset: ImageDataset, model: nn.Module, schedule: Schedule,
                     device: torch.device, speed: Speed = Speed()) -> nn.Module:
    layout = torch.channels_last if speed.channels_last else torch.contiguous_format
    model.to(device, memory_format=layout).train()
    forward = torch.compile(model) if speed.compile else model
    optimizer = _optimizer(spec, model.parameters())
    per_epoch = steps_per_epoch(spec, len(dataset.pool))
    padded = _padded_pool(dataset, spec.training.augment.crop_padding)
    schedule = on_device(schedule, device)
    for step in range(schedule.batches.shape[0]):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(spec, step, per_epoch)  # a Python float: no device sync
        images, labels = _batch(dataset, padded, schedule, step, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=speed.amp):
            loss = F.cross_entropy(forward(images.contiguous(memory_format=layout)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.to(memory_format=torch.contiguous_format).eval()


# Stacking pays while one model's step is little work: per-op overheads are shared and the wide
# network runs channels_last, the CPU's fast layout. Measured on 2 CPU cores (benchmarks/results/):
# ResNet18 at width 1 (350 GFLOP per step) gained nothing, width 1/4 (22 GFLOP) ~1.15x at G=2,
# the CNN and width 1/8 (0.4 and 5.5 GFLOP) ~1.3x, with no further gain past G of 4 to 8.
STEP_WORK = 24e9
MAX_STACK = 16  # also the most work an interrupted build can lose
MEMORY_SHARE = 0.25  # of the device's total memory, for one group's training


def stack_size(flops_per_image: float, batch_size: int, bytes_per_model: float, memory: float, models: int) -> int:
    """Models per stacked group (1: train one at a time) from one model's work per step and footprint."""
    by_work = math.ceil(STEP_WORK / max(flops_per_image * batch_size, 1.0))
    by_memory = int(memory * MEMORY_SHARE // max(bytes_per_model, 1.0))
    return max(1, min(by_work, by_memory, MAX_STACK, models))


def _shapes_device(model: nn.Module) -> str:
    """Where to run a pass that only needs shapes: the meta device if the model is on it, else the CPU."""
    return "meta" if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())) else "cpu"


def training_flops(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """FLOP of one training image, forward and backward (convolutions and matmuls, as FlopCounterMode counts).

    The count follows from the shapes alone, so a model on the ``meta`` device (the budget's, built before
    anything is allocated) counts the same as its real copy."""
    device = _shapes_device(model)
    model = copy.deepcopy(model).to(device).train()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(torch.zeros(2, *input_shape, device=device)),
                        torch.zeros(2, dtype=torch.long, device=device)).backward()
    return counter.get_total_flops() / 2


def check_batch_trains(model: nn.Module, batch_size: int, input_shape: tuple[int, ...], arch: str) -> None:
    """One SpecError unless ``model`` can train on batches of ``batch_size``: a BatchNorm over a 1x1 map sees
    one value per channel in a batch of one, and training would stop there with a traceback. Shapes only:
    on the meta device where the model is (the budget's), else on zeros."""
    if batch_size >= 2:  # every BatchNorm then sees two values per channel at least
        return
    device = _shapes_device(model)
    probe = copy.deepcopy(model).to(device).train()
    try:
        with torch.no_grad():
            probe(torch.zeros((batch_size, *input_shape), device=device))
    except (RuntimeError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"training.batch_size: {batch_size}: {arch} cannot train on batches of {batch_size} "
                        f"({first}); use 2 or more") from None


def pool_training_work(spec: TaskSpec, pool_size: int, per_image: float) -> float:
    """FLOP of training the whole pool, ``per_image`` (``training_flops``) for every image each model trains on:
    what ``build_pool`` chooses its workers by, and the budget's count of their copies."""
    return spec.membership.n_models * trained_images(spec, pool_size) * per_image


_TASK_FLOPS: dict[tuple, float] = {}


def task_training_flops(spec: TaskSpec, dataset: ImageDataset) -> float:
    """``training_flops`` of the task's model, counted once per process for each architecture and input shape."""
    # The registered builder too: a plugin, or a test, may register another model under a name used before.
    key = (MODELS.get(spec.model.arch), spec.model.model_dump_json(), tuple(dataset.input_shape), dataset.num_classes)
    if key not in _TASK_FLOPS:
        _TASK_FLOPS[key] = training_flops(init_model(spec, dataset, 0), dataset.input_shape)
    return _TASK_FLOPS[key]


def training_bytes(model: nn.Module, input_shape: tuple[int, ...], batch_size: int) -> float:
    """Rough training footprint of one model: activations kept for the backward (twice, for their
    gradients) and weights, gradients, momentum and the stacked copy."""
    def saved(batch: int) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            copy.deepcopy(model).cpu().train()(torch.zeros(batch, *input_shape)).sum()
        return total

    # Batches of 2 and 4, not 1 and 2: BatchNorm refuses a batch of one image on a 1x1 feature map.
    per_image = (saved(4) - saved(2)) // 2
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return 2 * per_image * batch_size + 4 * weights


# Two processes of one thread, each training its own group of G/2 models, against one process of two
# threads training G (2 CPU cores, AMD EPYC, fixed images, interleaved): fashion-mnist-cnn 13,300-13,800
# against 12,200-12,500 img/s, ResNet10 4,070-4,440 against 3,680-3,770. Each process runs its own
# operations, and no thread waits for the other at the end of each one. Starting a worker (importing
# torch) takes a few seconds, so only a build with at least WORKER_WORK FLOP of training uses them.
WORKERS = 2  # measured on 2 cores only; more cores are shared out among 2 processes
WORKER_WORK = 2e12


def trained_images(spec: TaskSpec, pool_size: int) -> int:
    """Images one pool model trains on: every step's batch, over all epochs."""
    return steps_per_epoch(spec, pool_size) * spec.training.epochs * spec.training.batch_size


def auto_workers(device: torch.device, threads: int, flops: float) -> int:
    """Processes to train a pool's groups in at once, for ``flops`` of training in all: 1 (this process) on
    an accelerator, with one thread, or for little work."""
    if device.type != "cpu" or threads < 2 or flops < WORKER_WORK:
        return 1
    return min(WORKERS, threads)


def device_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def memory_share(device: torch.device) -> float:
    """The bytes one group's work may take on ``device``: training a stacked group, or quantizing one
    (carried forward passes, moment tables)."""
    return MEMORY_SHARE * device_memory(device)


def auto_stack(spec: TaskSpec, dataset: ImageDataset, device: torch.device, force: bool = False) -> int:
    """How many models to train as one; 1 where stacking was not measured faster.

    Measured on the CPU only: elsewhere (and for models the wide network cannot hold, whose
    vmapped fallback trailed one-at-a-time training) the answer is 1 unless ``force``. The
    total memory, not the free memory, sets the cap, so that a resumed build forms the same
    groups (and the same bits) as an uninterrupted one on the same machine.
    """
    model, shape, batch = init_model(spec, dataset, 0), dataset.input_shape, spec.training.batch_size
    models = spec.membership.n_models
    if not force:
        if device.type != "cpu":
            return 1
        try:
            widen([model, model], shape)
        except NotStackable:
            return 1
    size = stack_size(task_training_flops(spec, dataset), batch, training_bytes(model, shape, batch),
                      device_memory(device), models)
    return max(size, min(2, models)) if force else size


def stack_schedules(schedules: list[Schedule]) -> Schedule:
    """One schedule for a group, batch-major: row b*G + g is model g's b-th image of the step.

    In that order a batch of G*B images reshapes without a copy into the wide network's input
    (B, G*C, H, W), where model g owns channel block g.
    """
    return Schedule(torch.stack([s.batches for s in schedules], dim=2).flatten(1),
                    torch.stack([s.shifts for s in schedules], dim=2).flatten(1, 2),
                    torch.stack([s.flips for s in schedules], dim=2).flatten(1))


def train_stacked(spec: TaskSpec, dataset: ImageDataset, models: list[nn.Module], schedules: list[Schedule],
                  device: torch.device, speed: Speed = Speed()) -> list[nn.Module]:
    """Train same-architecture models as one, each on its own schedule; equal to training them one by one.

    The models run as one wide network (pool/wide.py); an architecture that cannot be widened
    runs vmapped over stacked parameters and buffers instead (torch.func), which is slower on
    the CPU but takes any model. SGD (momentum, weight decay) acts elementwise and the loss is
    the sum of the models' own mean losses, so every model gets exactly its own update.
    """
    group, batch, classes = len(models), spec.training.batch_size, dataset.num_classes
    # Grouped convolutions want channels_last on the CPU: in NCHW, oneDNN computes the weight
    # gradient of a convolution with one input channel per group some 100x slower (benchmarks/).
    wide_layout = speed.channels_last or device.type == "cpu"
    layout = torch.channels_last if wide_layout else torch.contiguous_format
    try:
        wide = widen(models, dataset.input_shape).to(device, memory_format=layout).train()
        forward = torch.compile(wide) if speed.compile else wide
        params = list(wide.parameters())
    except NotStackable:
        wide = None
        weights, buffers = stack_module_state([m.to(device).train() for m in models])
        weights = {name: p.detach().requires_grad_() for name, p in weights.items()}
        params = list(weights.values())
        template = models[0]

        def one(w: dict, b: dict, images: torch.Tensor) -> torch.Tensor:
            return functional_call(template, (w, b), (images,))

        vmapped = torch.vmap(one, in_dims=(0, 0, 1), out_dims=1)

        def forward(images: torch.Tensor) -> torch.Tensor:
            return vmapped(weights, buffers, images.view(batch, group, *images.shape[1:]))

    optimizer = _optimizer(spec, params)
    per_epoch = steps_per_epoch(spec, len(dataset.pool))
    padded = _padded_pool(dataset, spec.training.augment.crop_padding)
    schedule = on_device(stack_schedules(schedules), device)
    for step in range(schedule.batches.shape[0]):
        for param_group in optimizer.param_groups:
            param_group["lr"] = learning_rate(spec, step, per_epoch)
        # the wide network's input straight from the gather: model g's images in channel block g
        images, labels = _batch(dataset, padded, schedule, step, device, group if wide is not None else None)
        if wide is not None:
            images = images.contiguous(memory_format=layout)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=speed.amp):
            logits = forward(images).reshape(batch * group, classes)
            # Each model's mean loss, summed over models: each model gets exactly its own gradient.
            loss = F.cross_entropy(logits, labels, reduction="sum") / batch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    trained = []
    for index, model in enumerate(models):
        if wide is not None:
            state = unstack_state(wide, group, index)
        else:
            state = {name: t[index].detach() for name, t in {**weights, **buffers}.items()}
        model.load_state_dict(state)
        trained.append(model.to(device).eval())
    return trained
