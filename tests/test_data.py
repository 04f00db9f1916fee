from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import fabricate
from conftest import SHARED_FASHION
from mia_ptq_bench.data import DATASETS, load_dataset
from mia_ptq_bench.data.loaders import read_idx
from mia_ptq_bench.errors import DataError
from mia_ptq_bench.spec.schema import DatasetSpec


def test_digits_split_is_fixed_and_disjoint() -> None:
    a = DATASETS.get("digits")(Path("."), False)
    b = DATASETS.get("digits")(Path("."), False)
    assert (len(a.pool), len(a.test), a.num_classes, a.input_shape) == (1297, 500, 10, (1, 8, 8))
    assert torch.equal(a.pool.images, b.pool.images) and torch.equal(a.test.labels, b.test.labels)
    pool_rows = {bytes(x.numpy()) for x in a.pool.images}
    assert sum(bytes(x.numpy()) in pool_rows for x in a.test.images) < 50  # digits has a few duplicates, no leak of the split
    assert a.pool.images.max() == 255 and a.pool.images.dtype == torch.uint8


def test_subset_and_resize() -> None:
    data = load_dataset(DatasetSpec(name="digits", pool_size=100, test_size=40, image_size=16))
    assert (len(data.pool), len(data.test), data.input_shape) == (100, 40, (1, 16, 16))
    again = load_dataset(DatasetSpec(name="digits", pool_size=100, test_size=40, image_size=16))
    assert torch.equal(data.pool.images, again.pool.images)
    other = load_dataset(DatasetSpec(name="digits", pool_size=100, subset_seed=1))
    assert not torch.equal(data.pool.labels, other.pool.labels)


def test_normalize_uses_channel_statistics() -> None:
    data = DATASETS.get("digits")(Path("."), False)
    x = data.normalize(data.pool.images)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx_files(tmp_path: Path, compress: bool) -> None:
    arrays = fabricate.fashion_mnist(tmp_path / "fashion-mnist", compress=compress)
    data = DATASETS.get("fashion-mnist")(tmp_path, False)
    assert data.input_shape == (1, 28, 28) and len(data.pool) == 20 and len(data.test) == 8
    assert np.array_equal(data.pool.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(data.test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_fashion_mnist_in_torchvision_layout(tmp_path: Path) -> None:
    fabricate.fashion_mnist(tmp_path / "FashionMNIST" / "raw", compress=False)
    assert len(DATASETS.get("fashion-mnist")(tmp_path, False).pool) == 20


def test_truncated_idx_is_a_data_error(tmp_path: Path) -> None:
    fabricate.fashion_mnist(tmp_path / "fashion-mnist", compress=False)
    path = tmp_path / "fashion-mnist" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="IDX header promises"):
        read_idx(path)


@pytest.mark.skipif(not SHARED_FASHION.is_dir(), reason=f"real Fashion-MNIST not present at {SHARED_FASHION}")
def test_real_fashion_mnist() -> None:
    data = DATASETS.get("fashion-mnist")(SHARED_FASHION.parent, False)
    assert (len(data.pool), len(data.test), data.num_classes) == (60000, 10000, 10)
    assert torch.bincount(data.pool.labels).tolist() == [6000] * 10
    assert 0.27 < data.mean[0] < 0.30 and 0.34 < data.std[0] < 0.37


def test_cifar10_pickles(tmp_path: Path) -> None:
    written = fabricate.cifar10(tmp_path)
    data = DATASETS.get("cifar10")(tmp_path, False)
    assert (len(data.pool), len(data.test), data.input_shape, data.num_classes) == (30, 5, (3, 32, 32), 10)
    first, labels = written["train"][0]
    assert np.array_equal(data.pool.images[0].numpy().reshape(-1), first[0])
    assert data.pool.labels[:6].tolist() == labels


def test_cifar100_pickles(tmp_path: Path) -> None:
    written = fabricate.cifar100(tmp_path)
    data = DATASETS.get("cifar100")(tmp_path, False)
    assert (len(data.pool), len(data.test), data.num_classes) == (12, 4, 100)
    assert data.test.labels.tolist() == written["test"][1]


def test_tinyimagenet_folders(tmp_path: Path) -> None:
    info = fabricate.tinyimagenet(tmp_path)
    data = DATASETS.get("tinyimagenet")(tmp_path, False)
    assert (len(data.pool), len(data.test), data.input_shape, data.num_classes) == (9, 4, (3, 64, 64), 3)
    assert data.pool.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # classes in sorted wnid order
    assert data.test.labels.tolist() == info["val_labels"]
    gray = data.test.images[0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert (tmp_path / "tiny-imagenet-200.decoded.npz").is_file()
    cached = DATASETS.get("tinyimagenet")(tmp_path, False)
    assert torch.equal(cached.pool.images, data.pool.images)


@pytest.mark.parametrize("name, hint", [
    ("fashion-mnist", "--download"), ("cifar10", "--download"), ("cifar100", "--download"),
    ("tinyimagenet", "tiny-imagenet-200.zip"),
])
def test_missing_dataset_says_how_to_get_it(tmp_path: Path, name: str, hint: str) -> None:
    with pytest.raises(DataError) as info:
        DATASETS.get(name)(tmp_path, False)
    assert str(tmp_path) in str(info.value) and hint in str(info.value)


@pytest.mark.parametrize("name, array, message", [
    ("train-labels-idx1-ubyte", np.zeros(19, np.uint8), "labels must have one entry per image: (19,) labels for 20 images"),
    ("train-labels-idx1-ubyte", np.full(20, 200, np.uint8), "fashion-mnist: training labels must lie in 0..9, found 200..200"),
    ("t10k-images-idx3-ubyte", np.zeros(8 * 28 * 28, np.uint8), "images must be uint8 (N, C, H, W), got torch.uint8 (6272, 1)"),
], ids=["counts-differ", "label-out-of-range", "one-dimensional-images"])
def test_fashion_mnist_files_of_the_wrong_shape_are_one_data_error(tmp_path: Path, name: str, array: np.ndarray,
                                                                   message: str) -> None:
    fabricate.fashion_mnist(tmp_path / "fashion-mnist", compress=False)
    fabricate.idx(tmp_path / "fashion-mnist" / name, array, compress=False)
    with pytest.raises(DataError) as caught:
        load_dataset(DatasetSpec(name="fashion-mnist"), tmp_path)
    assert message in str(caught.value)


@pytest.mark.parametrize("content", [pickle.dumps(7), b"\x80\x04garbage that is no pickle",
                                     pickle.dumps({b"data": np.zeros(100, np.uint8), b"labels": [0]})],
                         ids=["an-int", "garbage", "wrong-size"])
def test_a_damaged_cifar_batch_is_one_data_error(tmp_path: Path, content: bytes) -> None:
    fabricate.cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(content)
    with pytest.raises(DataError, match=r"data_batch_2: (cannot read CIFAR batch|CIFAR batch)"):
        load_dataset(DatasetSpec(name="cifar10"), tmp_path)


def test_tinyimagenet_decodes_again_over_a_damaged_cache_and_gives_row_major_images(tmp_path: Path) -> None:
    fabricate.tinyimagenet(tmp_path)
    first = DATASETS.get("tinyimagenet")(tmp_path, False)
    # the decoder stacks images transposed from HWC: the trainers need row-major pixels from the first run on
    assert first.pool.images.is_contiguous() and first.test.images.is_contiguous()
    decoded = tmp_path / "tiny-imagenet-200.decoded.npz"
    decoded.write_bytes(decoded.read_bytes()[:200])  # truncated: not a zip any more
    again = DATASETS.get("tinyimagenet")(tmp_path, False)
    assert torch.equal(again.pool.images, first.pool.images) and again.pool.images.is_contiguous()
