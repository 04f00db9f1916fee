"""Pool training: the study-style reference loop against the project's trainer, in one run on one device.

    python benchmarks/pool_training.py --task fashion-mnist-resnet18 --data-root DATA [--models 2] [--epochs 2]
    python benchmarks/pool_training.py --task cifar10-resnet18 --synthetic            # 32x32x3 without CIFAR

Reference: torchvision transforms on PIL images in a DataLoader, float32, one model at a time
(pool/reference.py). Ours: the dataset resident on the device, crops and flips applied to the
batch on the device, bfloat16 autocast and channels_last on CUDA (pool/train.py). Both train
the same models on the same members for the same epochs; the output gives images per second,
peak GPU memory, mean test accuracy, the ratio, and the device.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mia_ptq_bench.data import ImageDataset, Split, load_dataset
from mia_ptq_bench.data.base import make_dataset
from mia_ptq_bench.environment import describe_device
from mia_ptq_bench.pool import pool_keep_masks
from mia_ptq_bench.pool.reference import train_reference
from mia_ptq_bench.pool.train import Speed, init_model, make_schedule, steps_per_epoch, train_sequential
from mia_ptq_bench.inference import accuracy
from mia_ptq_bench.spec import load_task


def synthetic(pool: int, test: int, classes: int = 10, seed: int = 0) -> ImageDataset:
    """Learnable 32x32x3 images: a class-dependent smooth pattern plus noise."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.nn.functional.interpolate(torch.rand(classes, 3, 4, 4, generator=generator) * 255, size=(32, 32),
                                               mode="bilinear", align_corners=False)

    def split(count: int) -> Split:
        labels = torch.randint(0, classes, (count,), generator=generator)
        noise = torch.randn(count, 3, 32, 32, generator=generator) * 60
        return Split((patterns[labels] + noise).clamp(0, 255).to(torch.uint8), labels)

    return make_dataset("synthetic", split(pool), split(test), classes)


def peak_memory(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "n/a"


def run(label: str, spec, data: ImageDataset, keep: np.ndarray, models: int, device: torch.device, train) -> float:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    accuracies = []
    for index in range(models):
        model = train(index)
        accuracies.append(accuracy(model, data, data.test, device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    seen = models * spec.training.epochs * steps_per_epoch(spec, len(data.pool)) * spec.training.batch_size
    print(f"{label:10} {seen / seconds:12.0f} img/s  {seconds:8.1f} s  peak memory {peak_memory(device):>10}  "
          f"test accuracy {100 * np.mean(accuracies):.2f}%", flush=True)
    return seen / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="fashion-mnist-resnet18")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--synthetic", action="store_true", help="32x32x3 synthetic images instead of the task's data")
    parser.add_argument("--pool-size", type=int, default=None)
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--width", type=float, default=None)
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers of the reference loop")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    spec = load_task(args.task)
    updates = {}
    if args.epochs:
        updates["training"] = spec.training.model_copy(update={"epochs": args.epochs})
    if args.width:
        updates["model"] = spec.model.model_copy(update={"width": args.width})
    spec = spec.model_copy(update=updates)
    if args.synthetic:
        data = synthetic(args.pool_size or 50_000, 10_000)
    else:
        dataset_spec = spec.dataset.model_copy(update={"pool_size": args.pool_size} if args.pool_size else {})
        data = load_dataset(dataset_spec, args.data_root)
    keep = pool_keep_masks(spec, len(data.pool))
    print(f"device: {describe_device(device)} · torch {torch.__version__} · task {spec.id} ({spec.model.arch} "
          f"x{spec.model.width:g}) · {len(data.pool)} pool images {data.input_shape} · {args.models} models · "
          f"{spec.training.epochs} epochs · batch {spec.training.batch_size}")

    def reference(index: int):
        return train_reference(spec, data, init_model(spec, data, index), np.flatnonzero(keep[index]), device,
                               workers=args.workers, seed=index)

    resident = data.to(device)
    speed = Speed.for_device(device)

    def ours(index: int):
        schedule = make_schedule(spec, np.flatnonzero(keep[index]), len(data.pool), index)
        return train_sequential(spec, resident, init_model(spec, data, index), schedule, device, speed)

    baseline = run("reference", spec, data, keep, args.models, device, reference)
    fast = run("ours", spec, data, keep, args.models, device, ours)
    print(f"ratio (ours / reference images per second): {fast / baseline:.2f}")


if __name__ == "__main__":
    main()
