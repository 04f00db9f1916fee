from __future__ import annotations

import math
import os
import pickle
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import fabricate
from conftest import SHARED_FASHION
from mia_ptq_bench.data import DATASETS, Split, load_dataset, loaders
from mia_ptq_bench.data.base import make_dataset, seeded_subset
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


def test_the_largest_subset_seed_a_task_may_give_draws_both_splits() -> None:
    # the test split's seed is the next one, which numpy refuses past 2**32 - 1: it wraps to 0
    top = load_dataset(DatasetSpec(name="digits", pool_size=100, test_size=40, subset_seed=2**32 - 1))
    assert (len(top.pool), len(top.test)) == (100, 40)
    assert torch.equal(top.test.labels, seeded_subset(DATASETS.get("digits")(Path("."), False).test, 40, 0).labels)


def test_normalize_uses_channel_statistics() -> None:
    data = DATASETS.get("digits")(Path("."), False)
    x = data.normalize(data.pool.images)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3


def test_channel_statistics_are_exact_whatever_the_thread_count() -> None:
    # 5,000 images (two chunks of the sums), three channels of different spreads. The reference is
    # exact rational arithmetic; a float sum of the 20,000 scaled pixels per channel rounds along
    # the way (the exactness check is what catches that: sums this small are not split across threads,
    # but those of a real dataset are, and the statistics enter the data digest).
    from fractions import Fraction
    from statistics import mean, variance

    from mia_ptq_bench.data.base import channel_stats

    generator = torch.Generator().manual_seed(3)
    images = torch.stack([torch.randint(0, 256, (5000, 2, 2), generator=generator),
                          torch.randint(100, 104, (5000, 2, 2), generator=generator),
                          torch.randint(0, 2, (5000, 2, 2), generator=generator) * 255], 1).to(torch.uint8)
    expected_mean, expected_std = [], []
    for channel in range(3):
        values = [Fraction(int(v), 255) for v in images[:, channel].flatten()]
        expected_mean.append(float(mean(values)))
        expected_std.append(math.sqrt(variance(values)))
    threads = torch.get_num_threads()
    try:
        found = []
        for count in (1, 3):
            torch.set_num_threads(count)
            found.append(channel_stats(images))
    finally:
        torch.set_num_threads(threads)
    assert found[0] == found[1] == (tuple(expected_mean), tuple(expected_std))


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


def test_a_damaged_gzip_stream_is_a_data_error(tmp_path: Path) -> None:
    fabricate.fashion_mnist(tmp_path / "fashion-mnist", compress=True)
    path = tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[12:52] = bytes(40)  # inside the deflate stream, past gzip's own header: zlib.error, not OSError
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: cannot read IDX file: Error -3 while decompressing"):
        load_dataset(DatasetSpec(name="fashion-mnist"), tmp_path)


def test_an_empty_test_split_is_one_data_error(tmp_path: Path) -> None:
    fabricate.fashion_mnist(tmp_path / "fashion-mnist", test=0, compress=False)
    with pytest.raises(DataError, match=r"^fashion-mnist: the test split holds no images"):
        DATASETS.get("fashion-mnist")(tmp_path, False)


def test_an_idx_file_that_inflates_beyond_its_header_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    # A valid header for 2x2x2 images followed by 64 MB of zeros, compressed to about 64 KB: the reader
    # stops one byte past what the header promises instead of inflating the whole file.
    import gzip
    import tracemalloc

    path = tmp_path / "train-images-idx3-ubyte.gz"
    header = bytes([0, 0, 0x08, 3]) + b"".join(n.to_bytes(4, "big") for n in (2, 2, 2))
    with gzip.open(path, "wb") as handle:
        handle.write(header + bytes(8))
        for _ in range(64):
            handle.write(bytes(1 << 20))
    assert path.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"IDX header promises 8 values, file holds more"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # the old reader held all 64 MB
    promised = tmp_path / "huge-idx1-ubyte"
    promised.write_bytes(bytes([0, 0, 0x08, 1]) + (1 << 31).to_bytes(4, "big"))
    with pytest.raises(DataError, match=r"promises 2147483648 values, more than the"):
        read_idx(promised)
    short = tmp_path / "short-idx3-ubyte"
    short.write_bytes(bytes([0, 0, 0x08, 3, 0, 0]))
    with pytest.raises(DataError, match=r"IDX header cut short: 3 sizes promised, 0 present"):
        read_idx(short)


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
    ("train-labels-idx1-ubyte", np.zeros(19, np.uint8),
     "train-labels-idx1-ubyte: one label per image of train-images-idx3-ubyte, an IDX file of shape (20,); found (19,)"),
    ("train-labels-idx1-ubyte", np.full(20, 200, np.uint8), "fashion-mnist: training labels must lie in 0..9, found 200..200"),
    ("t10k-images-idx3-ubyte", np.zeros(8 * 28 * 28, np.uint8),
     "t10k-images-idx3-ubyte: Fashion-MNIST images are 28x28, an IDX file of shape (n, 28, 28); found (6272,)"),
    ("train-images-idx3-ubyte", np.zeros((20, 5, 7), np.uint8), "train-images-idx3-ubyte: Fashion-MNIST images are "
                                                                "28x28, an IDX file of shape (n, 28, 28); found (20, 5, 7)"),
    ("train-images-idx3-ubyte", np.zeros((), np.uint8), "train-images-idx3-ubyte: Fashion-MNIST images are 28x28, an "
                                                        "IDX file of shape (n, 28, 28); found ()"),
    ("t10k-labels-idx1-ubyte", np.zeros((8, 1), np.uint8), "t10k-labels-idx1-ubyte: one label per image of "
                                                           "t10k-images-idx3-ubyte, an IDX file of shape (8,); found (8, 1)"),
], ids=["counts-differ", "label-out-of-range", "one-dimensional-images", "not-28x28", "no-dimensions", "2-d-labels"])
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


@pytest.mark.parametrize("which", ["wnids.txt", "val/val_annotations.txt", "train/n01/images/n01_0.JPEG"])
def test_a_fifo_in_a_tinyimagenet_folder_is_one_data_error_not_a_hang(tmp_path: Path, which: str) -> None:
    import signal

    fabricate.tinyimagenet(tmp_path)
    target = tmp_path / "tiny-imagenet-200" / which
    target.unlink()
    os.mkfifo(target)  # opening it for reading blocks until someone writes

    def stuck(signum, frame):
        raise TimeoutError("reading a FIFO in the data folder blocked")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(30)
    try:
        with pytest.raises(DataError, match=rf"{re.escape(which)}: not a regular file$"):
            DATASETS.get("tinyimagenet")(tmp_path, False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_tinyimagenet_decodes_again_over_a_damaged_cache_and_gives_row_major_images(tmp_path: Path) -> None:
    fabricate.tinyimagenet(tmp_path)
    first = DATASETS.get("tinyimagenet")(tmp_path, False)
    # the decoder stacks images transposed from HWC: the trainers need row-major pixels from the first run on
    assert first.pool.images.is_contiguous() and first.test.images.is_contiguous()
    decoded = tmp_path / "tiny-imagenet-200.decoded.npz"
    decoded.write_bytes(decoded.read_bytes()[:200])  # truncated: not a zip any more
    again = DATASETS.get("tinyimagenet")(tmp_path, False)
    assert torch.equal(again.pool.images, first.pool.images) and again.pool.images.is_contiguous()


# --- CIFAR pickles: only numpy's array globals, and batches in the one layout ------------------------------------

class _OpensAFile:
    """A 'batch' whose unpickling creates a file: a pickle runs whatever callable it names."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_cifar_pickle_that_calls_anything_but_numpy_is_refused_unrun(tmp_path: Path) -> None:
    fabricate.cifar10(tmp_path)
    marker = tmp_path / "ran"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": _OpensAFile(marker), b"labels": [0]}))
    with pytest.raises(DataError, match=r"data_batch_1: CIFAR batch refused: it calls (io|builtins)\.open,"):
        load_dataset(DatasetSpec(name="cifar10"), tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", [list, dict])
def test_a_small_cifar_pickle_of_shared_nested_references_is_refused_at_once(tmp_path: Path, kind) -> None:
    # 40 levels, each holding the one below twice: a 19 KB file that rebuilding, or numpy reading, walks 2**40 times
    fabricate.cifar10(tmp_path)
    nest = [0]
    for _ in range(40):
        nest = [nest, nest] if kind is list else {0: nest, 1: nest}
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": np.zeros((6, 3072), np.uint8), b"labels": [0] * 6, b"extra": nest},
                                   protocol=2))
    with pytest.raises(DataError, match=r"data_batch_1: CIFAR batch refused: a list or dict inside another's values"):
        load_dataset(DatasetSpec(name="cifar10"), tmp_path)


class _ObjectDtypeWithoutListPickle:
    """numpy.dtype("O8") with flags that clear NPY_LIST_PICKLE: numpy itself would then read the array's raw
    bytes as object pointers (and free them), so a file naming only numpy's own globals could crash or worse."""

    def __reduce__(self):
        return np.dtype, ("O8", False, True), (3, "|", None, None, None, -1, -1, 63 & ~2)


class _ArrayOfPointers:
    def __reduce__(self):
        return (np.ndarray.__reduce__(np.zeros(1, np.uint8))[0], (np.ndarray, (0,), b"b"),
                (1, (1,), _ObjectDtypeWithoutListPickle(), False, struct.pack("<Q", 0x4141414141414140)))


def test_a_cifar_pickle_cannot_hand_numpy_a_crafted_dtype(tmp_path: Path) -> None:
    fabricate.cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": _ArrayOfPointers(), b"labels": [0]}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_1: CIFAR batch refused: an array of type 'O8'"):
        load_dataset(DatasetSpec(name="cifar10"), tmp_path)


def test_a_cifar_pickle_s_big_endian_labels_are_read_in_their_byte_order(tmp_path: Path) -> None:
    data, labels = fabricate.cifar10(tmp_path)["train"][0]
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": data, b"labels": np.asarray(labels, dtype=">i2")}, protocol=2))
    assert DATASETS.get("cifar10")(tmp_path, False).pool.labels[:6].tolist() == labels


def _python2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch as the real release holds it: Python 2 cPickle, protocol 2, str keys, numpy.core paths."""
    def text(value: bytes) -> bytes:
        return b"U" + bytes([len(value)]) + value  # SHORT_BINSTRING: a Python 2 str

    out = b"\x80\x02}(" + text(b"data") + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
    out += text(b"b") + b"\x87R(K\x01M" + struct.pack("<H", len(data)) + b"M" + struct.pack("<H", 3072)
    out += b"\x86cnumpy\ndtype\n" + text(b"u1") + b"K\x00K\x01\x87R(K\x03" + text(b"|")
    out += b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    out += b"\x89T" + struct.pack("<i", data.nbytes) + data.tobytes() + b"tb"
    return out + text(b"labels") + b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"eu."


@pytest.mark.parametrize("protocol", ["python2", 0, 2, 4, 5])
def test_cifar_batches_of_every_pickle_protocol_still_load(tmp_path: Path, protocol: str | int) -> None:
    data, labels = fabricate.cifar10(tmp_path)["train"][0]
    batch = (_python2_batch(data, labels) if protocol == "python2"
             else pickle.dumps({b"data": data, b"labels": labels}, protocol=protocol))
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(batch)
    loaded = DATASETS.get("cifar10")(tmp_path, False)
    assert np.array_equal(loaded.pool.images[:6].reshape(6, -1).numpy(), data)
    assert loaded.pool.labels[:6].tolist() == labels


@pytest.mark.parametrize("data, labels, message", [
    (np.zeros((6, 32, 32, 3), np.uint8), [0] * 6, "field b'data' must be a uint8 array of shape (n, 3072), one CHW "
                                                  "32x32 image per row; found uint8 (6, 32, 32, 3)"),
    (np.zeros((3072, 6), np.uint8), [0] * 6, "found uint8 (3072, 6)"),
    (np.full((6, 3072), 300), [0] * 6, "found int64 (6, 3072)"),
    (np.zeros((6, 3072), np.uint8), [0.9] * 6, "field b'labels' must hold integer labels, found float64"),
    (np.zeros((6, 3072), np.uint8), [0, 1, 2, 3, 4, 10], "field b'labels' must lie in 0..9, found 0..10"),
    (np.zeros((6, 3072), np.uint8), [0] * 5, "field b'labels' must hold one label per image: shape (5,) for 6 images"),
], ids=["hwc", "transposed", "int64", "float-labels", "label-out-of-range", "labels-short"])
def test_a_cifar_batch_that_would_need_a_cast_or_another_reshape_is_one_data_error(
        tmp_path: Path, data: np.ndarray, labels: list, message: str) -> None:
    fabricate.cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": data, b"labels": labels}))
    with pytest.raises(DataError) as caught:
        DATASETS.get("cifar10")(tmp_path, False)
    assert str(caught.value).startswith(f"{batch}: CIFAR batch ") and message in str(caught.value)


# --- downloads and normalisation --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, module", [("fashion-mnist", "mnist"), ("cifar10", "cifar")])
def test_a_failed_download_is_one_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
                                             module: str) -> None:
    import urllib.error

    from conftest import needed

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network (simulated)")

    monkeypatch.setattr(needed(f"torchvision.datasets.{module}", "--download needs torchvision"),
                        "download_and_extract_archive", offline)
    with pytest.raises(DataError) as caught:
        load_dataset(DatasetSpec(name=name), tmp_path, download=True)
    message = str(caught.value)
    assert message.startswith(f"{name}: download from http") and "failed" in message
    assert "no network (simulated)" in message and "--data-root" in message


@pytest.mark.parametrize("train_images, message", [
    (np.zeros((0, 28, 28), np.uint8), "fashion-mnist: the training split holds no images"),
    (np.full((20, 28, 28), 7, np.uint8), "fashion-mnist: zero spread in channel 0: every training pixel has value 7"),
    (np.zeros((20, 0, 28), np.uint8), r"train-images-idx3-ubyte: Fashion-MNIST images are 28x28, an IDX file of "
                                      r"shape \(n, 28, 28\); found \(20, 0, 28\)"),
], ids=["empty", "constant", "no pixels"])
def test_training_images_without_spread_are_a_data_error(tmp_path: Path, train_images: np.ndarray,
                                                         message: str) -> None:
    folder = tmp_path / "fashion-mnist"
    fabricate.fashion_mnist(folder, compress=False)
    fabricate.idx(folder / "train-images-idx3-ubyte", train_images, compress=False)
    fabricate.idx(folder / "train-labels-idx1-ubyte", np.zeros(len(train_images), np.uint8), compress=False)
    with pytest.raises(DataError, match=message):
        load_dataset(DatasetSpec(name="fashion-mnist"), tmp_path)


def test_images_without_pixels_are_a_data_error() -> None:
    empty = Split(torch.zeros((4, 1, 0, 8), dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(DataError, match=r"^toy: the images have no pixels \(0x8\)"):
        make_dataset("toy", empty, empty, 10)


def test_one_constant_channel_is_a_data_error() -> None:
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[:, 1] = 9
    split = Split(images, torch.zeros(4, dtype=torch.long))
    with pytest.raises(DataError, match="x: zero spread in channel 1: every training pixel has value 9"):
        make_dataset("x", split, split, 10)


# --- TinyImageNet: the cache, the wnid list and the images --------------------------------------------------------

def test_tinyimagenet_cache_is_decoded_again_once_the_folder_changes(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fabricate.tinyimagenet(tmp_path)
    base = tmp_path / "tiny-imagenet-200"
    decodes = []

    def counted(*args):
        decodes.append(args)
        return decode(*args)

    decode = loaders._decode_tinyimagenet
    monkeypatch.setattr(loaders, "_decode_tinyimagenet", counted)
    load = lambda: DATASETS.get("tinyimagenet")(tmp_path, False)  # noqa: E731
    first = load()
    assert torch.equal(load().pool.images, first.pool.images) and len(decodes) == 1  # unchanged: from the cache
    (base / "val" / "val_annotations.txt").write_text("".join(f"val_{i}.JPEG\tn03\t0\t0\t63\t63\n" for i in range(3)))
    assert load().test.labels.tolist() == [2, 2, 2]
    image = base / "train" / "n01" / "images" / "n01_0.JPEG"
    mtime = image.stat().st_mtime_ns
    image.write_bytes((base / "train" / "n02" / "images" / "n02_0.JPEG").read_bytes())
    os.utime(image, ns=(mtime + 10**9, mtime + 10**9))  # a later mtime even where the clock is coarse
    assert torch.equal(load().pool.images[0], first.pool.images[3]) and len(decodes) == 3


def test_the_tinyimagenet_cache_follows_the_annotated_images_and_ignores_other_files(tmp_path: Path) -> None:
    fabricate.tinyimagenet(tmp_path)
    val = tmp_path / "tiny-imagenet-200" / "val"
    (val / "images" / "notes.txt").symlink_to(tmp_path / "nowhere")  # dangling, and never read by the decoder
    (val / "images" / "sub").mkdir()
    moved = val / "images" / "sub" / "val_0.JPEG"
    (val / "images" / "val_0.JPEG").rename(moved)
    annotations = val / "val_annotations.txt"
    annotations.write_text(annotations.read_text().replace("val_0.JPEG", "sub/val_0.JPEG"))
    load = lambda: DATASETS.get("tinyimagenet")(tmp_path, False)  # noqa: E731
    first = load()
    mtime = moved.stat().st_mtime_ns
    moved.write_bytes((val / "images" / "val_1.JPEG").read_bytes())  # an annotated image in a subfolder
    os.utime(moved, ns=(mtime + 10**9, mtime + 10**9))
    assert torch.equal(load().test.images[0], first.test.images[1])


def test_a_wnid_listed_twice_is_a_data_error(tmp_path: Path) -> None:
    fabricate.tinyimagenet(tmp_path)
    wnids = tmp_path / "tiny-imagenet-200" / "wnids.txt"
    wnids.write_text("n02\nn01\nn03\nn01\n")
    with pytest.raises(DataError, match=f"^{re.escape(str(wnids))}: wnid n01 listed more than once"):
        load_dataset(DatasetSpec(name="tinyimagenet"), tmp_path)


def test_a_tinyimagenet_image_that_is_not_64x64_is_a_data_error_naming_it(tmp_path: Path) -> None:
    from PIL import Image

    fabricate.tinyimagenet(tmp_path)
    image = tmp_path / "tiny-imagenet-200" / "train" / "n01" / "images" / "n01_1.JPEG"
    Image.fromarray(np.zeros((50, 64, 3), np.uint8)).save(image, quality=100)
    message = f"^{re.escape(str(image))}: image is 64x50 pixels, TinyImageNet images are 64x64"
    with pytest.raises(DataError, match=message):
        load_dataset(DatasetSpec(name="tinyimagenet"), tmp_path)


@pytest.mark.parametrize("warning_only", [False, True], ids=["bomb-error", "bomb-warning-as-error"])
def test_a_decompression_bomb_is_a_data_error_naming_the_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               warning_only: bool) -> None:
    from PIL import Image

    fabricate.tinyimagenet(tmp_path)
    image = tmp_path / "tiny-imagenet-200" / "train" / "n01" / "images" / "n01_0.JPEG"  # the first one decoded
    if warning_only:  # between the limit and twice it PIL only warns: an exception where warnings are errors
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)
    else:  # a header that claims 20000x20000 pixels
        jpeg = bytearray(image.read_bytes())
        start = jpeg.index(b"\xff\xc0") + 5  # SOF0: marker, length (2), precision (1), height (2), width (2)
        jpeg[start : start + 4] = struct.pack(">HH", 20000, 20000)
        image.write_bytes(bytes(jpeg))
    with warnings.catch_warnings(), pytest.raises(DataError, match=f"^{re.escape(str(image))}: cannot decode image: "
                                                                      ".*decompression bomb"):
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        load_dataset(DatasetSpec(name="tinyimagenet"), tmp_path)


def _blocks(k: int, channels: int = 3) -> np.ndarray:
    """A 64x64 image of flat 16x16 blocks, one per JPEG coding unit, so that it decodes within a few levels
    (saved without chroma subsampling, whose upsampling would blend the colours at block edges).

    The value steps by 48 per block row, 12 per block column and 64 per channel (offset per image ``k``), so a
    transpose or a channel swap moves some pixel by 36 levels or more."""
    row, col, channel = np.meshgrid(np.arange(4), np.arange(4), np.arange(channels), indexing="ij")
    values = (16 + (48 * row + 12 * col + 64 * channel + 7 * k) % 224).astype(np.uint8)  # clear of 0 and 255
    return values.repeat(16, axis=0).repeat(16, axis=1)


def test_tinyimagenet_pixels_keep_their_rows_columns_and_channel_order(tmp_path: Path) -> None:
    from PIL import Image

    fabricate.tinyimagenet(tmp_path)
    base = tmp_path / "tiny-imagenet-200"
    pool = [_blocks(k) for k in range(9)]  # in load order: wnids sorted, then file names sorted
    for pixels, (wnid, i) in zip(pool, [(wnid, i) for wnid in ("n01", "n02", "n03") for i in range(3)]):
        Image.fromarray(pixels).save(base / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", quality=100, subsampling=0)
    test = [_blocks(9, channels=1).repeat(3, axis=2)] + [_blocks(k) for k in (10, 11, 12)]
    Image.fromarray(test[0][:, :, 0]).save(base / "val" / "images" / "val_0.JPEG", quality=100)  # grayscale
    for i in (1, 2, 3):
        Image.fromarray(test[i]).save(base / "val" / "images" / f"val_{i}.JPEG", quality=100, subsampling=0)
    data = DATASETS.get("tinyimagenet")(tmp_path, False)
    for split, written in ((data.pool, pool), (data.test, test)):
        decoded = split.images.permute(0, 2, 3, 1).numpy().astype(int)  # (N, C, H, W) back to the written HWC
        assert np.abs(decoded - np.stack(written)).max() <= 4
