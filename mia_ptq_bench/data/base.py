"""In-memory image datasets: uint8 tensors plus per-channel normalisation.

Everything is held as uint8 (N, C, H, W) so that even TinyImageNet fits in memory,
and normalised batch by batch. A loader returns the full training split (the
membership pool) and the test split; subsetting and resizing for small tasks
happen here, identically for every dataset.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from ..registry import Registry

DATA_ENV = "MPTQ_DATA"


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"labels must have one entry per image: {tuple(self.labels.shape)} labels for "
                            f"{self.images.shape[0]} images")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: np.ndarray | torch.Tensor) -> Split:
        index = torch.as_tensor(index, dtype=torch.long)
        return Split(self.images[index], self.labels[index])


@dataclass(frozen=True)
class ImageDataset:
    name: str
    pool: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.pool.images.shape[1:])  # type: ignore[return-value]

    def to(self, device: str | torch.device) -> ImageDataset:
        """The same dataset with its images and labels resident on ``device`` (no per-batch host copies)."""
        move = lambda split: Split(split.images.to(device), split.labels.to(device))  # noqa: E731
        return ImageDataset(self.name, move(self.pool), move(self.test), self.num_classes, self.mean, self.std)

    def digest(self) -> str:
        """sha256 of what a pool learns from: both splits' pixels and labels, the classes and the normalisation.

        A cached pool records it, so that a pool trained on other files (another --data-root, a
        different download) is never taken for this data's."""
        digest = hashlib.sha256(repr((self.name, self.num_classes, self.mean, self.std)).encode())
        for split in (self.pool, self.test):
            for tensor in (split.images, split.labels):
                array = np.ascontiguousarray(tensor.cpu().numpy())
                digest.update(repr((array.dtype.str, array.shape)).encode())
                digest.update(memoryview(array).cast("B"))  # no copy of the pixels
        return digest.hexdigest()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) on any device -> normalised float32."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float() / 255.0 - mean) / std


Loader = Callable[[Path, bool], ImageDataset]
DATASETS: Registry[Loader] = Registry("dataset")


@dataclass(frozen=True)
class DatasetShape:
    """What a dataset holds, known without loading it: the task's memory and time are estimated from this
    before any data is read. A loader registers its shape in DATASET_SHAPES; without one, the estimate
    waits until the data is loaded."""

    channels: int
    height: int
    width: int
    classes: int
    pool: int  # images in the training split
    test: int

    @classmethod
    def of(cls, dataset: ImageDataset) -> DatasetShape:
        c, h, w = dataset.input_shape
        return cls(c, h, w, dataset.num_classes, len(dataset.pool), len(dataset.test))

    def model_input(self, image_size: int | None) -> tuple[int, int, int]:
        """What the model sees: (channels, height, width), the images resized to ``image_size`` if a task asks."""
        return (self.channels, image_size or self.height, image_size or self.width)


DATASET_SHAPES: dict[str, DatasetShape] = {}


def default_data_root() -> Path:
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mia-ptq-bench" / "data"


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (n - 1 in the denominator) of uint8 images scaled to [0, 1].

    The sums are of whole numbers, so exact whatever order the threads add them in, and each
    statistic is its exact value rounded once to float64 (the std: its variance rounded, then the
    square root). A float sum would round in an order that follows the thread count, and the
    statistics enter the data digest a pool records.
    """
    channels = images.shape[1]
    count = images.numel() // channels
    if count < 2:
        raise ValueError(f"a std needs at least 2 pixels per channel, got {count}")
    total = [0] * channels
    squares = [0] * channels
    for chunk in images.split(4096):  # int64 squares of a chunk at a time, not of every pixel at once
        wide = chunk.to(torch.int64)
        total = [a + b for a, b in zip(total, wide.sum(dim=(0, 2, 3)).tolist())]
        squares = [a + b for a, b in zip(squares, wide.square_().sum(dim=(0, 2, 3)).tolist())]
        del wide  # before the next chunk's copy is made
    mean = tuple(float(Fraction(t, 255 * count)) for t in total)
    spread = [Fraction(count * s - t * t, 255 * 255 * count * (count - 1)) for t, s in zip(total, squares)]
    return mean, tuple(math.sqrt(v) for v in spread)


def make_dataset(name: str, pool: Split, test: Split, num_classes: int) -> ImageDataset:
    for split_name, split in (("training", pool), ("test", test)):
        if len(split) and (int(split.labels.min()) < 0 or int(split.labels.max()) >= num_classes):
            raise DataError(f"{name}: {split_name} labels must lie in 0..{num_classes - 1}, found "
                            f"{int(split.labels.min())}..{int(split.labels.max())}")
    # Row-major pixels whatever the decoder left (a stack of transposed images keeps their strides):
    # the trainers view batches without copying.
    pool = Split(pool.images.contiguous(), pool.labels)
    test = Split(test.images.contiguous(), test.labels)
    # Normalising divides by each channel's std: refuse data that has none rather than train on inf/NaN.
    # Compared as integers, since a float std of constant pixels is a rounding residue, not always 0.
    if not len(pool):
        raise DataError(f"{name}: the training split holds no images, so there is no mean or std to normalise by")
    if not len(test):
        raise DataError(f"{name}: the test split holds no images, so no test accuracy or attack population")
    if not (pool.images.shape[2] and pool.images.shape[3]):
        raise DataError(f"{name}: the images have no pixels ({pool.images.shape[2]}x{pool.images.shape[3]})")
    flat = (pool.images.amin(dim=(0, 2, 3)) == pool.images.amax(dim=(0, 2, 3))).nonzero().flatten().tolist()
    if flat:
        raise DataError(f"{name}: zero spread in channel {flat[0]}: every training pixel has value "
                        f"{int(pool.images[0, flat[0], 0, 0])}, so its std is 0 and normalising would divide by it")
    mean, std = channel_stats(pool.images)
    return ImageDataset(name=name, pool=pool, test=test, num_classes=num_classes, mean=mean, std=std)


def oversized_subset(spec, pool: int, test: int) -> str | None:
    """What is wrong with a dataset spec whose ``pool_size`` or ``test_size`` asks for more images than its
    split of ``pool`` or ``test`` holds (a subset is never silently the whole split), or None."""
    for field, size, available, kind in (("pool_size", spec.pool_size, pool, "training"),
                                         ("test_size", spec.test_size, test, "test")):
        if size is not None and size > available:
            return f"dataset.{field}: {size} images asked for, but the {spec.name} {kind} split holds {available}"
    return None


def seeded_subset(split: Split, size: int | None, seed: int) -> Split:
    if size is None or size >= len(split):
        return split
    order = np.random.RandomState(seed).permutation(len(split))[:size]
    return split.take(np.sort(order))


def resize(split: Split, side: int | None) -> Split:
    if side is None or split.images.shape[-1] == side and split.images.shape[-2] == side:
        return split
    x = F.interpolate(split.images.float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return Split(x.round_().clamp_(0, 255).to(torch.uint8), split.labels)
