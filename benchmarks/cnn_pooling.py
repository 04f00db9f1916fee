"""Is the max-pool worth replacing in the stacked CNN's training step? One run answers it.

    python benchmarks/cnn_pooling.py --data-root DATA [--save]

The stacked trainer runs fashion-mnist-cnn's pool as one wide network (pool/wide.py). This prints,
for that wide network's training step (forward, backward, SGD; random images, as the speed does not
depend on them): the share of each kind of operator (torch.profiler), then the step's time with the
native max-pool against two stand-ins of the same output shape (wherever the wide network has a
max-pool: alone, or inside a PooledConv2d), timed interleaved, best round counting: three elementwise maxima over strided views (the same values) and a bare strided pick (no
max at all, so a floor for any pooling written from elementwise ops). Then each layer's forward and
backward, timed alone on a real step's tensors (no profiler), and the first max-pool's backward timed
the same number of calls untraced (before and after) and under torch.profiler, with what the profiler
records as ``fill_`` in it: whether its shares of zero-fills can be taken at face value. Last, what
drawing, augmenting and normalising one step's images costs, as the trainer does it.
"""

from __future__ import annotations

import argparse
import copy
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from machine import best_time, describe, idle_fraction, load_average, mean_time, save, say, wait_for_quiet
from mia_ptq_bench.allocator import keep_freed_memory
from mia_ptq_bench.data import load_dataset
from mia_ptq_bench.models import build_model
from mia_ptq_bench.pool.train import _batch, _padded_pool, auto_stack, make_schedule, on_device, stack_schedules
from mia_ptq_bench.pool.wide import PooledConv2d, widen
from mia_ptq_bench.spec import load_task


class StridedPick(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, ::2, ::2]


class ThreeMaxima(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.maximum(x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2]),
                             torch.maximum(x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]))


def with_pooling(wide: nn.Module, pooling: type[nn.Module] | None) -> nn.Module:
    """The wide network with ``pooling`` for every max-pool: in a Sequential, or inside a PooledConv2d."""
    net = copy.deepcopy(wide)
    for module in net.modules():
        if pooling is not None and isinstance(module, PooledConv2d):
            module.pool = pooling()
        elif pooling is not None and isinstance(module, nn.Sequential):
            for i, layer in enumerate(module):
                if isinstance(layer, nn.MaxPool2d):
                    module[i] = pooling()
    return net.to(memory_format=torch.channels_last).train()


def _own_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x``, copied for a layer that would overwrite it (an in-place ReLU), so that the input stays as recorded."""
    return x.clone() if getattr(layer, "inplace", False) else x


def step_tensors(net: nn.Sequential, images: torch.Tensor, labels: torch.Tensor, batch: int, classes: int):
    """Each layer's input in a real step, and the gradient its output gets back, as the backward hands
    it on (its layout included: Flatten's backward hands the last ReLU a plain NCHW gradient)."""
    activations, grads = [images], [None] * len(net)
    for index, layer in enumerate(net):
        activations.append(layer(_own_input(layer, activations[-1])))
        activations[-1].register_hook(lambda grad, index=index: grads.__setitem__(index, grad))
    logits = activations[-1].reshape(labels.numel(), classes)
    (F.cross_entropy(logits, labels, reduction="sum") / batch).backward()
    return [a.detach() for a in activations[:-1]], grads


def layer_backward(layer: nn.Module, input_needs_grad: bool, x: torch.Tensor, grad: torch.Tensor):
    """A function computing the gradients ``layer``'s backward computes in a step from ``grad`` (its
    parameters', and its input's unless that is the images), or None if there are none. Called
    through ``autograd.grad``, so without the step's accumulation into ``.grad``."""
    x = x.detach().requires_grad_(input_needs_grad)
    y = layer(_own_input(layer, x))
    wanted = ([x] if input_needs_grad else []) + list(layer.parameters())
    return (lambda: torch.autograd.grad(y, wanted, grad, retain_graph=True)) if wanted else None


def layer_times(net: nn.Sequential, inputs: list[torch.Tensor], grads: list[torch.Tensor], device: torch.device,
                repeats: int) -> list[tuple[str, float, float]]:
    """(layer, forward seconds, backward seconds) of each layer of the wide network, each the fastest of
    ``repeats`` calls alone (the forward on a detached input, so without autograd's recording)."""
    times = []
    for index, layer in enumerate(net):
        forward = best_time(lambda: layer(_own_input(layer, inputs[index])), device, repeats)
        backward = layer_backward(layer, index > 0, inputs[index], grads[index])
        times.append((f"{index} {type(layer).__name__}", forward,
                      best_time(backward, device, repeats) if backward else 0.0))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="fashion-mnist-cnn")
    parser.add_argument("--data-root", type=Path)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--patience", type=float, default=120.0)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    keep_freed_memory()
    spec = load_task(args.task)
    data = load_dataset(spec.dataset, args.data_root)
    cpu = torch.device("cpu")
    group, batch, classes = auto_stack(spec, data, cpu), spec.training.batch_size, data.num_classes
    say(f"# CNN pooling benchmark · {datetime.now():%Y-%m-%d %H:%M} · task {args.task}, {group} models stacked, "
        f"batch {batch} each")
    say(describe(cpu))
    say(f"load average at start: {load_average()} · idle share now {wait_for_quiet(args.patience):.2f}")

    torch.manual_seed(0)
    models = [build_model(spec.model, data.input_shape, classes) for _ in range(group)]
    wide = widen(models, data.input_shape)
    ways = {"native max-pool": None, "three maxima": ThreeMaxima, "strided pick": StridedPick}
    nets = {name: with_pooling(wide, pooling) for name, pooling in ways.items()}
    optimizers = {name: torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9) for name, net in nets.items()}
    images = torch.randn(batch, group * data.input_shape[0], *data.input_shape[1:])
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (batch * group,))

    def step(name: str) -> None:
        loss = F.cross_entropy(nets[name](images).reshape(batch * group, classes), labels, reduction="sum") / batch
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    for name in nets:
        for _ in range(5):
            step(name)
    with torch.profiler.profile() as profiler:
        for _ in range(args.steps):
            step("native max-pool")
    totals = sorted(((e.key, e.self_cpu_time_total) for e in profiler.key_averages()), key=lambda kv: -kv[1])
    whole = sum(t for _, t in totals)
    say()
    say("native step, share of self CPU time (torch.profiler), operators above 2%:")
    for key, spent in totals:
        if spent / whole >= 0.02:
            say(f"  {key:45s} {100 * spent / whole:5.1f}%")

    best = {name: float("inf") for name in nets}
    for _ in range(args.rounds):
        for name in nets:
            start = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            best[name] = min(best[name], (time.perf_counter() - start) / args.steps)
    say()
    say(f"training step, best of {args.rounds} interleaved rounds of {args.steps} steps (idle {idle_fraction():.2f}):")
    for name, seconds in best.items():
        say(f"  {name:18s} {1e3 * seconds:7.1f} ms  {batch * group / seconds:8.0f} img/s  "
            f"{best['native max-pool'] / seconds:5.2f}x native")

    say()
    # Single layers are short and noisy on a shared machine: more calls than the step's rounds.
    net, calls = nets["native max-pool"], 3 * args.rounds
    inputs, grads = step_tensors(net, images, labels, batch, classes)
    parts = layer_times(net, inputs, grads, cpu, calls)
    layers_total = sum(f + b for _, f, b in parts)
    say(f"each layer timed alone on a real step's tensors, fastest of {calls} calls (idle {idle_fraction():.2f}), ms:")
    say(f"  {'layer':22s} {'forward':>8} {'backward':>8} {'of all layers':>13}")
    for name, forward, backward in parts:
        say(f"  {name:22s} {1e3 * forward:8.2f} {1e3 * backward:8.2f} {100 * (forward + backward) / layers_total:12.1f}%")
    say(f"  {'all layers':22s} {1e3 * sum(f for _, f, _ in parts):8.2f} {1e3 * sum(b for _, _, b in parts):8.2f}"
        f"   (sum of fastest calls; the whole step above, {1e3 * best['native max-pool']:.1f} ms, is the mean "
        "step of its fastest round, loss and SGD included)")
    # The first max-pool, alone or inside a PooledConv2d (there the bias comes after it, so its output
    # gets the layer's own gradient, and its input is the convolution without the bias).
    first = next(i for i, layer in enumerate(net) if isinstance(layer, (nn.MaxPool2d, PooledConv2d)))
    pool, pool_input = net[first], inputs[first]
    if isinstance(pool, PooledConv2d):
        with torch.no_grad():
            pool, pool_input = pool.pool, pool._conv_forward(pool_input, pool.weight, None)
    backward = layer_backward(pool, True, pool_input, grads[first])
    before = mean_time(backward, cpu, calls)
    with torch.profiler.profile() as profiler:
        traced = mean_time(backward, cpu, calls)
    after = mean_time(backward, cpu, calls)
    recorded = {e.key: e for e in profiler.key_averages()}
    pool_op = recorded["aten::max_pool2d_with_indices_backward"]
    fill = recorded["aten::fill_"].self_cpu_time_total / pool_op.count if "aten::fill_" in recorded else 0.0
    say(f"the first max-pool's backward, input {tuple(pool_input.shape)}, mean of {calls} calls: "
        f"untraced {1e3 * before:.2f} ms before and {1e3 * after:.2f} after; traced {1e3 * traced:.2f} ms, "
        f"of which torch.profiler records {pool_op.cpu_time_total / pool_op.count / 1e3:.2f} ms in the operator and "
        f"{fill / 1e3:.2f} as fill_")
    members = np.arange(len(data.pool) // 2)
    schedule = on_device(stack_schedules([make_schedule(spec, members, len(data.pool), i) for i in range(group)]), cpu)
    padded = _padded_pool(data, spec.training.augment.crop_padding)

    def prepare(index: int) -> torch.Tensor:
        drawn, _ = _batch(data, padded, schedule, index, cpu, group)
        return drawn.contiguous(memory_format=torch.channels_last)

    fastest = best_time(lambda: [prepare(index) for index in range(args.steps)], cpu, args.rounds) / args.steps
    say(f"drawing, augmenting and normalising one step's {batch * group} images: {1e3 * fastest:.1f} ms")
    say(f"load average at the end: {load_average()}")
    if args.save:
        save(f"cnn_pooling-{args.task}-{datetime.now():%Y%m%d-%H%M}.txt")


if __name__ == "__main__":
    main()
