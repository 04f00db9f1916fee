"""Pool training on one machine: a study-style loop, the sequential trainer and the stacked trainer, in one run.

    python benchmarks/pool_training.py --task fashion-mnist-cnn --data-root DATA --save
    python benchmarks/pool_training.py --task fashion-mnist-resnet --data-root DATA --save

Prints the machine (CPU, threads, torch, load), the measured fp32 peak (a 2048x2048 GEMM, best
of N) and what the model's own convolutions reach alone and stacked, the model's FLOP per
training image (FlopCounterMode, forward + backward), two ceilings in images per second (every
FLOP at the GEMM peak; only the model's convolutions, each at its measured stacked rate), and
for each trainer: images per second, % of both ceilings, mean test accuracy, ratios. The
trainers run interleaved (--rounds), each after waiting for an idle CPU (the cores are
shared), and the best round counts. --save writes the output under benchmarks/results/.

(a) study: written like the study's Codes/train.py (QuTongxi/Quant-MIA at e543e3c):
    lines 100-102 (a Subset of the members in a DataLoader, shuffled, batch size, 4 workers),
    111-112 (SGD with momentum 0.9 and weight decay, CosineAnnealingLR over the epochs),
    115-129 (per batch: cross_entropy, zero_grad, backward, step; the scheduler per epoch),
    with the per-image torchvision transforms of Codes/Utils/utils.py lines 29-35
    (RandomHorizontalFlip, RandomCrop with padding, ToTensor, Normalize) on PIL images.
(b) sequential: pool/train.py train_sequential, one model at a time.
(c) stacked: pool/train.py train_stacked, one group of G models as one wide network.
(d) stacked in processes: the same G models as two groups of G/2, each trained by train_stacked in
    its own worker process of one thread, both at once: what build_pool does on a CPU for a pool
    with much training (pool/train.py auto_workers). The workers are started, and torch imported
    in them, before the clock starts, as a pool build pays that once; the start-up is printed.
(e) as (d), with bfloat16 autocast (``evaluate --amp``), where the device has native bfloat16
    arithmetic: another arithmetic than the study's float32, so its rate is also given against a
    ceiling at the measured bfloat16 GEMM peak.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import pickle
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from mia_ptq_bench.allocator import keep_freed_memory
from mia_ptq_bench.data import ImageDataset, load_dataset
from mia_ptq_bench.pool import pool_keep_masks
from mia_ptq_bench.pool.train import (Speed, auto_stack, init_model, make_schedule, native_bfloat16,
                                      steps_per_epoch, train_sequential, train_stacked, training_flops)
from mia_ptq_bench.pool.wide import widen
from mia_ptq_bench.inference import accuracy
from mia_ptq_bench.spec import load_task

from machine import best_time, describe, gemm_peak, idle_fraction, load_average, save, say, sync, wait_for_quiet


def layer_shapes(model: nn.Module, input_shape: tuple[int, ...], batch: int) -> list[tuple[str, nn.Conv2d, tuple]]:
    """Each Conv2d of the model with the shape of its input at the training batch size."""
    shapes, hooks = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(
                lambda m, args, out, name=name: shapes.append((name, m, tuple(args[0].shape)))))
    with torch.no_grad():
        model.eval()(torch.zeros(batch, *input_shape))
    for hook in hooks:
        hook.remove()
    return shapes


def conv_step(conv: nn.Conv2d, shape: tuple, group: int, device: torch.device, layout,
              first: bool = False) -> tuple[float, float]:
    """FLOP and best seconds of one training step of ``conv`` (forward, weight and input gradients) for ``group`` models;
    ``first``: it reads the images, whose gradient no trainer computes."""
    batch, channels, height, width = shape
    x = torch.randn(batch, group * channels, height, width, device=device).contiguous(memory_format=layout)
    weight = torch.randn(group * conv.out_channels, channels // conv.groups, *conv.kernel_size,
                         device=device).contiguous(memory_format=layout)
    x.requires_grad_(not first)
    weight.requires_grad_()
    out_shape = F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, group * conv.groups).shape
    grad = torch.randn(out_shape, device=device).contiguous(memory_format=layout)

    def step() -> None:
        F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, group * conv.groups).backward(grad)

    macs = out_shape.numel() * (channels // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]
    flop = 2 * macs * (3 if x.requires_grad else 2)
    return flop, best_time(step, device, 5)


# --- (a) the study-style loop --------------------------------------------------------------

class StudyMembers(Dataset):
    """Members as PIL images, transformed per image, like torchvision's dataset classes."""

    def __init__(self, data: ImageDataset, members: np.ndarray, transform) -> None:
        self.images = data.pool.images.numpy()
        self.labels = data.pool.labels.numpy()
        self.members, self.transform = members, transform

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, i: int):
        image = self.images[self.members[i]]
        image = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
        return self.transform(image), int(self.labels[self.members[i]])


def train_study_style(spec, data: ImageDataset, index: int, members: np.ndarray, device: torch.device,
                      workers: int) -> nn.Module:
    recipe = spec.training
    train_trans = transforms.Compose(
        ([transforms.RandomHorizontalFlip()] if recipe.augment.hflip else [])
        + ([transforms.RandomCrop(data.input_shape[1], padding=recipe.augment.crop_padding)]
           if recipe.augment.crop_padding else [])
        + [transforms.ToTensor(), transforms.Normalize(data.mean, data.std)])
    train_dl = DataLoader(StudyMembers(data, members, train_trans), batch_size=recipe.batch_size, shuffle=True,
                          num_workers=workers)
    m = init_model(spec, data, index).to(device)
    optim = torch.optim.SGD(m.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=recipe.epochs)
    for _ in range(recipe.epochs):
        m.train()
        for x, y in train_dl:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(m(x), y)
            optim.zero_grad()
            loss.backward()
            optim.step()
        sched.step()
    return m.eval()


# --- (d) stacked groups in worker processes ----------------------------------------------------

def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    keep_freed_memory()


def _ready(seconds: float) -> tuple[int, int]:
    time.sleep(seconds)  # long enough that every worker takes one
    return os.getpid(), torch.get_num_threads()


def _train_group_here(spec, handed: bytes, schedules, indices: list[int], device: str,
                      amp: bool | None = None) -> list[dict]:
    data = pickle.loads(handed)  # by value, as build_pool hands it over (not through /dev/shm)
    models = [init_model(spec, data, i) for i in indices]
    trained = train_stacked(spec, data, models, schedules, torch.device(device),
                            Speed.for_device(torch.device(device), amp))
    return [m.state_dict() for m in trained]


# --- the run ---------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="fashion-mnist-cnn")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--models", type=int, default=2, help="models trained by the study-style and sequential loops")
    parser.add_argument("--stack", type=int, default=None, help="models in the stacked group (default: auto_stack)")
    parser.add_argument("--epochs", type=int, default=None, help="override the task's epochs")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of the three trainers")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers of the study-style loop (study: 4)")
    parser.add_argument("--patience", type=float, default=600, help="seconds to wait for an idle CPU before a run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--save", action="store_true", help="write the output to benchmarks/results/")
    args = parser.parse_args()
    device = torch.device(args.device)
    spec = load_task(args.task)
    if args.epochs:
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"epochs": args.epochs})})
    data = load_dataset(spec.dataset, args.data_root)
    keep = pool_keep_masks(spec, len(data.pool))
    batch = spec.training.batch_size
    group = args.stack or auto_stack(spec, data, device, force=True)
    group = min(group, spec.membership.n_models)
    models = min(args.models, group)
    speed = Speed.for_device(device)

    started = datetime.datetime.now()
    say(f"# pool training benchmark · {started:%Y-%m-%d %H:%M} · task {spec.id} (pool hash {spec.pool_hash[:12]})")
    say(describe(device))
    kept = keep_freed_memory()
    say(f"allocator: {'freed memory kept for reuse (mia_ptq_bench.allocator), for every trainer below' if kept else 'default (not glibc)'}")
    say(f"load average at start: {load_average()} · idle share now {idle_fraction():.2f}")
    say(f"model: {spec.model.arch} x{spec.model.width:g} {spec.model.options or ''} · input {data.input_shape} · "
        f"{len(data.pool)} pool images, {len(data.test)} test · {spec.training.epochs} epochs · batch {batch} · "
        f"{steps_per_epoch(spec, len(data.pool))} steps per epoch")
    say()

    idle = wait_for_quiet(args.patience)
    peak = gemm_peak(device)
    say(f"measured peak (idle {idle:.2f}): fp32 GEMM 2048x2048, best of 10: {peak / 1e9:.0f} GFLOP/s")
    bfloat16 = native_bfloat16(device) and not speed.amp  # on CUDA, (b) to (d) run bfloat16 already
    if bfloat16:
        bf16_peak = gemm_peak(device, dtype=torch.bfloat16)
        say(f"measured peak: bfloat16 GEMM 2048x2048, best of 10: {bf16_peak / 1e9:.0f} GFLOP/s "
            f"({bf16_peak / peak:.2f}x fp32), for (e)")
    template = init_model(spec, data, 0)
    wide_layout = torch.channels_last if device.type == "cpu" or speed.channels_last else torch.contiguous_format
    say(f"the model's convolutions, one training step (forward + gradients) at batch {batch}, GFLOP/s:")
    say(f"  {'layer':28} {'input':>20} {'alone':>8} {'x' + str(group) + ' stacked':>12}")
    conv_seconds = 0.0  # per training image, every convolution at its stacked rate
    for name, conv, shape in layer_shapes(template, data.input_shape, batch):
        first = shape[1:] == tuple(data.input_shape)  # fed the images (RGB too, not only one channel)
        flop, alone = conv_step(conv, shape, 1, device, torch.contiguous_format, first)
        flop_together, together = conv_step(conv, shape, group, device, wide_layout, first)
        conv_seconds += together / (batch * group)
        say(f"  {name:28} {str(shape[1:]):>20} {flop / alone / 1e9:8.0f} {flop_together / together / 1e9:12.0f}")
    flops = training_flops(template, data.input_shape)
    ceiling = peak / flops
    conv_ceiling = 1 / conv_seconds
    say(f"FLOP per training image (FlopCounterMode, forward + backward): {flops / 1e6:.2f} M")
    say(f"ceiling at the GEMM peak: {ceiling:,.0f} images/s")
    say(f"ceiling of the model's own convolutions, each at its x{group} stacked rate above and nothing else run "
        f"(no BatchNorm, activations, loss or SGD): {conv_ceiling:,.0f} images/s")
    say()

    per_model = spec.training.epochs * steps_per_epoch(spec, len(data.pool)) * batch
    members = [np.flatnonzero(keep[i]) for i in range(group)]
    # (a)'s DataLoader goes through each model's own members once per epoch, fewer images than (b)'s and
    # (c)'s schedules of full batches: each trainer is credited the images it trained on.
    study_images = spec.training.epochs * sum(len(members[i]) for i in range(models))
    schedules = [make_schedule(spec, members[i], len(data.pool), i) for i in range(group)]
    resident = data.to(device)

    def study() -> list[nn.Module]:
        return [train_study_style(spec, data, i, members[i], device, args.workers) for i in range(models)]

    def sequential() -> list[nn.Module]:
        return [train_sequential(spec, resident, init_model(spec, data, i), schedules[i], device, speed)
                for i in range(models)]

    def sequential_channels_last() -> list[nn.Module]:
        return [train_sequential(spec, resident, init_model(spec, data, i), schedules[i], device,
                                 Speed(amp=speed.amp, channels_last=True)) for i in range(models)]

    def stacked() -> list[nn.Module]:
        return train_stacked(spec, resident, [init_model(spec, data, i) for i in range(group)], schedules, device,
                             speed)

    processes, halves = 2, [list(range(group))[: (group + 1) // 2], list(range(group))[(group + 1) // 2:]]
    start = time.perf_counter()
    workers = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=_start_worker, initargs=(max(torch.get_num_threads() // processes, 1),))
    started_workers: dict[int, int] = {}
    while len(started_workers) < processes:  # until every worker has answered: started, torch imported
        started_workers.update(f.result() for f in [workers.submit(_ready, 0.5) for _ in range(processes)])
    worker_threads = list(started_workers.values())
    startup = time.perf_counter() - start

    def stacked_in_processes(amp: bool | None = None) -> list[nn.Module]:
        handed = pickle.dumps(resident)
        futures = [workers.submit(_train_group_here, spec, handed, [schedules[i] for i in half], half, str(device),
                                  amp) for half in halves]
        trained = []
        for half, future in zip(halves, futures):
            for index, state in zip(half, future.result()):
                model = init_model(spec, data, index)
                model.load_state_dict(state)
                trained.append(model.to(device).eval())
        return trained

    trainers = {"(a) study-style": (study, study_images), "(b) sequential": (sequential, models * per_model),
                "(b') sequential, channels_last": (sequential_channels_last, models * per_model),
                f"(c) stacked x{group}": (stacked, group * per_model),
                f"(d) x{len(halves[0])} in {processes} processes": (stacked_in_processes, group * per_model)}
    if bfloat16:
        trainers["(e) as (d), bfloat16 autocast"] = (lambda: stacked_in_processes(amp=True), group * per_model)
    say(f"(d): {processes} worker processes of {worker_threads[0]} thread(s), started in {startup:.1f} s at most "
        "(once per pool build; not in the rates below)")
    try:
        widen([template, template], data.input_shape)
    except ValueError:
        say("(the wide network refuses this architecture: the stacked trainer runs vmapped)")
    rates: dict[str, list[float]] = {name: [] for name in trainers}
    accuracies: dict[str, list[list[float]]] = {name: [] for name in trainers}  # per round, per model
    say(f"{'trainer':32} {'round':>5} {'idle':>5} {'seconds':>8} {'img/s':>8} {'% ceiling':>9} {'test acc':>9}")
    for round_ in range(1, args.rounds + 1):
        for name, (train, images) in trainers.items():
            idle = wait_for_quiet(args.patience)
            sync(device)
            start = time.perf_counter()
            trained = train()
            sync(device)
            seconds = time.perf_counter() - start
            rate = images / seconds
            rates[name].append(rate)
            accuracies[name].append([accuracy(m, data, data.test, device) for m in trained])
            say(f"{name:32} {round_:5} {idle:5.2f} {seconds:8.1f} {rate:8.0f} {100 * rate / ceiling:8.1f}% "
                f"{100 * np.mean(accuracies[name][-1]):8.2f}%")
    say()
    # The accuracy beside a best rate is that round's: the study-style loop shuffles and augments
    # from torch's global generator, as the study's does, so each round trains on another order.
    best_round = {name: int(np.argmax(values)) for name, values in rates.items()}
    best = {name: rates[name][i] for name, i in best_round.items()}
    study_rate, sequential_rate = best["(a) study-style"], best["(b) sequential"]
    say(f"best round, images per second (models {models} for a/b, {group} for the others):")
    say(f"{'trainer':32} {'img/s':>8} {'% ceiling':>9} {'% convs':>8} {'x study':>8} {'x seq':>7} {'test acc':>9} "
        f"{'acc (first ' + str(models) + ')':>15}")
    for name, rate in best.items():
        round_accuracies = accuracies[name][best_round[name]]
        first = 100 * np.mean(round_accuracies[:models])
        say(f"{name:32} {rate:8.0f} {100 * rate / ceiling:8.1f}% {100 * rate / conv_ceiling:7.1f}% "
            f"{rate / study_rate:8.2f} {rate / sequential_rate:7.2f} "
            f"{100 * np.mean(round_accuracies):8.2f}% {first:14.2f}%")
    if bfloat16:
        name = "(e) as (d), bfloat16 autocast"
        say(f"(e) against the ceiling at the bfloat16 GEMM peak ({bf16_peak / flops:,.0f} images/s): "
            f"{100 * best[name] * flops / bf16_peak:.1f}%")
    workers.shutdown()
    say(f"load average at the end: {load_average()}")
    if args.save:
        save(f"pool_training-{spec.id}-{started:%Y%m%d-%H%M}.txt")


if __name__ == "__main__":
    main()
