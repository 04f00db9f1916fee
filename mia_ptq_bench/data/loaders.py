"""The built-in datasets, each read from its standard on-disk release.

CIFAR and TinyImageNet have readers of their own because torchvision's classes
verify the md5 of the official archives (so fabricated test files cannot load)
and TinyImageNet is not in torchvision; downloads still go through torchvision.
"""

from __future__ import annotations

import gzip
import math
import hashlib
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_npz_atomic
from ..errors import DataError
from .safe_pickle import Refused, load_batch
from .base import DATASET_SHAPES, DATASETS, DatasetShape, ImageDataset, Split, make_dataset


DATASET_SHAPES.update({
    "digits": DatasetShape(1, 8, 8, 10, 1297, 500),
    "fashion-mnist": DatasetShape(1, 28, 28, 10, 60_000, 10_000),
    "cifar10": DatasetShape(3, 32, 32, 10, 50_000, 10_000),
    "cifar100": DatasetShape(3, 32, 32, 100, 50_000, 10_000),
    "tinyimagenet": DatasetShape(3, 64, 64, 200, 100_000, 10_000),
})


@DATASETS.register("digits")
def load_digits(root: Path, download: bool) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits: 1,797 images, a fixed seeded 1,297/500 pool/test split."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    # 0..16 intensities map exactly onto uint8 without collisions.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    order = np.random.RandomState(0).permutation(len(labels))
    test_idx, pool_idx = np.sort(order[:500]), np.sort(order[500:])
    split = Split(torch.from_numpy(images), torch.from_numpy(labels))
    return make_dataset("digits", split.take(pool_idx), split.take(test_idx), 10)


# --- Fashion-MNIST: IDX files -------------------------------------------------------

_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8}


# The largest IDX payload read: Fashion-MNIST's training images are 47 MB. The payload is read only up to
# what the header promises (plus one byte, to tell a longer file), so a small compressed file that
# inflates to gigabytes costs no more memory than an honest one.
IDX_MAX_BYTES = 1 << 30


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0x0000TTDD, DD big-endian sizes, then data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            magic = handle.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
                raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
            sizes = handle.read(4 * magic[3])
            if len(sizes) < 4 * magic[3]:
                raise DataError(f"{path}: IDX header cut short: {magic[3]} sizes promised, {len(sizes) // 4} present")
            shape = tuple(int.from_bytes(sizes[4 * i: 4 * i + 4], "big") for i in range(magic[3]))
            expected = math.prod(shape)
            if expected > IDX_MAX_BYTES:
                raise DataError(f"{path}: IDX header promises {expected} values, more than the {IDX_MAX_BYTES} read")
            data = handle.read(expected + 1)
    except (OSError, EOFError, zlib.error) as exc:  # zlib.error: a damaged .gz stream
        raise DataError(f"{path}: cannot read IDX file: {exc}") from None
    if len(data) != expected:
        held = "more" if len(data) > expected else str(len(data))
        raise DataError(f"{path}: IDX header promises {expected} values, file holds {held}")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _find_fmnist(root: Path) -> dict[str, Path] | None:
    for folder in (root / "fashion-mnist", root / "FashionMNIST" / "raw", root):
        found = {}
        for key, stem in _FMNIST_FILES.items():
            for candidate in (folder / stem, folder / f"{stem}.gz"):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(_FMNIST_FILES):
            return found
    return None


def _download(name: str, root: Path, tv_class: str, test_too: bool = False) -> None:
    """Fetch with torchvision; offline, a dead mirror or a corrupt archive is one DataError, not a traceback
    (torchvision raises URLError, or RuntimeError once every mirror failed)."""
    import torchvision.datasets as tvd

    dataset = getattr(tvd, tv_class)
    try:
        for train in (True, False) if test_too else (True,):
            dataset(str(root), train=train, download=True)
    except (OSError, RuntimeError) as exc:
        source = getattr(dataset, "url", None) or " or ".join(getattr(dataset, "mirrors", []))
        raise DataError(f"{name}: download from {source or 'torchvision'} failed ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:200]}). Download it by hand and point --data-root/MPTQ_DATA "
                        f"at the folder holding it.") from None


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(root: Path, download: bool) -> ImageDataset:
    files = _find_fmnist(root)
    if files is None and download:
        _download("fashion-mnist", root, "FashionMNIST", test_too=True)
        files = _find_fmnist(root)
    if files is None:
        raise DataError(
            f"Fashion-MNIST not found under {root}: expected the four IDX files "
            f"({', '.join(_FMNIST_FILES.values())}, optionally .gz) in {root / 'fashion-mnist'}. "
            "Rerun with --download to fetch it with torchvision, or point --data-root/MPTQ_DATA at a folder holding them."
        )
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        image_path, label_path = files[f"{split}_images"], files[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(f"{image_path}: Fashion-MNIST images are 28x28, an IDX file of shape (n, 28, 28); "
                            f"found {images.shape}")
        if labels.shape != images.shape[:1]:
            raise DataError(f"{label_path}: one label per image of {image_path.name}, an IDX file of shape "
                            f"({len(images)},); found {labels.shape}")
    pool = Split(torch.from_numpy(arrays["train_images"].copy())[:, None], torch.from_numpy(arrays["train_labels"].astype(np.int64)))
    test = Split(torch.from_numpy(arrays["test_images"].copy())[:, None], torch.from_numpy(arrays["test_labels"].astype(np.int64)))
    return make_dataset("fashion-mnist", pool, test, 10)


# --- CIFAR: python pickles ------------------------------------------------------------

def _unpickle(path: Path) -> dict:
    try:
        return load_batch(path)
    except Refused as exc:
        raise DataError(f"{path}: CIFAR batch refused: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - unpickling a damaged file can raise almost anything
        raise DataError(f"{path}: cannot read CIFAR batch: {type(exc).__name__}: {str(exc)[:160]}") from None


def _cifar_split(paths: list[Path], label_key: bytes, num_classes: int) -> Split:
    images, labels = [], []
    for path in paths:
        batch = _unpickle(path)
        if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
            raise DataError(f"{path}: CIFAR batch lacks {b'data'!r} or {label_key!r}")
        # No conversion: a cast wraps 300 to 44 and a reshape turns HWC or transposed rows into other images.
        data, label = batch[b"data"], batch[label_key]
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
            found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DataError(f"{path}: CIFAR batch field {b'data'!r} must be a uint8 array of shape (n, 3072), "
                            f"one CHW 32x32 image per row; found {found}")
        field = f"{path}: CIFAR batch field {label_key!r}"
        try:
            label = np.asarray(label)
        except (ValueError, TypeError) as exc:
            raise DataError(f"{field} is not a list of labels ({exc})") from None
        if label.shape != (len(data),):
            raise DataError(f"{field} must hold one label per image: shape {label.shape} for {len(data)} images")
        if len(label) and label.dtype.kind not in "iu":
            raise DataError(f"{field} must hold integer labels, found {label.dtype}")
        if len(label) and (label.min() < 0 or label.max() >= num_classes):
            raise DataError(f"{field} must lie in 0..{num_classes - 1}, found {label.min()}..{label.max()}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(label.astype(np.int64))
    return Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def _load_cifar(root: Path, download: bool, *, name: str, folder: str, train: list[str], test: list[str],
                label_key: bytes, num_classes: int, tv_class: str) -> ImageDataset:
    base = root / folder
    missing = [f for f in train + test if not (base / f).is_file()]
    if missing and download:
        _download(name, root, tv_class)
        missing = [f for f in train + test if not (base / f).is_file()]
    if missing:
        raise DataError(
            f"{name} not found: {base} lacks {', '.join(missing)}. Rerun with --download to fetch the standard "
            f"python release with torchvision, or unpack it so that {base} exists under --data-root/MPTQ_DATA."
        )
    return make_dataset(name, _cifar_split([base / f for f in train], label_key, num_classes),
                        _cifar_split([base / f for f in test], label_key, num_classes), num_classes)


@DATASETS.register("cifar10")
def load_cifar10(root: Path, download: bool) -> ImageDataset:
    return _load_cifar(root, download, name="cifar10", folder="cifar-10-batches-py",
                       train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                       label_key=b"labels", num_classes=10, tv_class="CIFAR10")


@DATASETS.register("cifar100")
def load_cifar100(root: Path, download: bool) -> ImageDataset:
    return _load_cifar(root, download, name="cifar100", folder="cifar-100-python", train=["train"], test=["test"],
                       label_key=b"fine_labels", num_classes=100, tv_class="CIFAR100")


# --- TinyImageNet: JPEG folders -----------------------------------------------------------

_TIN_SIZE = (64, 64)


def _regular_file(path: Path) -> Path:
    """``path``, or one DataError where it is no regular file (a FIFO would block the read forever)."""
    if not path.is_file():
        raise DataError(f"{path}: {'missing' if not path.exists() and not path.is_symlink() else 'not a regular file'}")
    return path


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    _regular_file(path)
    try:
        with Image.open(path) as image:
            # checked before decoding: one odd image would otherwise fail the stack naming no file
            if image.size != _TIN_SIZE:
                raise DataError(f"{path}: image is {image.size[0]}x{image.size[1]} pixels, TinyImageNet images "
                                f"are {_TIN_SIZE[0]}x{_TIN_SIZE[1]}")
            return np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
    # the bomb error is no OSError; its warning is an exception only where warnings are errors
    except (OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{path}: cannot decode image: {exc}") from None


def _read_wnids(base: Path) -> list[str]:
    path = base / "wnids.txt"
    wnids = sorted(line.strip() for line in _regular_file(path).read_text().splitlines() if line.strip())
    duplicates = sorted({wnid for previous, wnid in zip(wnids, wnids[1:]) if previous == wnid})
    if duplicates:  # would load the class twice, under two labels
        raise DataError(f"{path}: wnid {', '.join(duplicates)} listed more than once")
    return wnids


def _listing(base: Path, wnids: list[str]) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """The (image, label) pairs the release holds: each class's training JPEGs, and the annotated val images."""
    index = {wnid: i for i, wnid in enumerate(wnids)}
    train = []
    for wnid in wnids:
        images = sorted((base / "train" / wnid / "images").glob("*.JPEG"))
        if not images:
            raise DataError(f"{base / 'train' / wnid / 'images'}: no .JPEG images for class {wnid}")
        train += [(path, index[wnid]) for path in images]
    val = []
    annotations = base / "val" / "val_annotations.txt"
    for number, line in enumerate(_regular_file(annotations).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DataError(f"{annotations}:{number}: expected 'file<TAB>wnid...' with a wnid from wnids.txt")
        val.append((base / "val" / "images" / fields[0], index[fields[1]]))
    return train, val


def _source_fingerprint(base: Path, listing: tuple[list[tuple[Path, int]], list[tuple[Path, int]]]) -> str:
    """Changes when any file the decoder reads changes: the two lists' contents, and the path, size and
    mtime of each listed image (a stat each, no reads: the release holds 110,000 of them)."""
    digest = hashlib.sha256()
    for listed in (base / "wnids.txt", base / "val" / "val_annotations.txt"):
        digest.update(listed.read_bytes() + b"\0")
    for path, _ in listing[0] + listing[1]:
        try:
            stat = path.stat()
            state = f"{stat.st_size}\0{stat.st_mtime_ns}"
        except OSError:  # missing, or a dangling link: the decoder reports it
            state = "unreadable"
        digest.update(f"{path.relative_to(base)}\0{state}\n".encode(errors="surrogateescape"))
    return digest.hexdigest()


def _decode_tinyimagenet(listing: tuple[list[tuple[Path, int]], list[tuple[Path, int]]],
                         num_classes: int) -> dict[str, np.ndarray]:
    (train, val), arrays = listing, {}
    for split, pairs in (("train", train), ("test", val)):
        arrays[f"{split}_x"] = np.ascontiguousarray(np.stack([_read_rgb(path) for path, _ in pairs]))
        arrays[f"{split}_y"] = np.asarray([label for _, label in pairs], np.int64)
    return {**arrays, "num_classes": np.asarray(num_classes)}


@DATASETS.register("tinyimagenet")
def load_tinyimagenet(root: Path, download: bool) -> ImageDataset:
    base = root / "tiny-imagenet-200"
    required = [base / "wnids.txt", base / "train", base / "val" / "val_annotations.txt", base / "val" / "images"]
    missing = [str(p.relative_to(root)) for p in required if not p.exists()]
    if missing:
        raise DataError(
            f"TinyImageNet not found under {root}: missing {', '.join(missing)}. Download "
            "http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into --data-root/MPTQ_DATA "
            "(no automatic download: torchvision does not ship this dataset)."
        )
    # Decoding 110,000 JPEGs takes minutes; keep the decoded arrays beside the folder, with a fingerprint
    # of the files they came from so that an edited folder is decoded again.
    wnids = _read_wnids(base)
    listing = _listing(base, wnids)
    source = _source_fingerprint(base, listing)
    decoded = root / "tiny-imagenet-200.decoded.npz"
    arrays = None
    if decoded.is_file():
        try:
            with np.load(decoded) as archive:
                if str(archive["source"]) == source:
                    arrays = {key: archive[key] for key in ("train_x", "train_y", "test_x", "test_y", "num_classes")}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):  # a damaged or older cache
            arrays = None
    if arrays is None:
        arrays = _decode_tinyimagenet(listing, len(wnids))
        arrays["source"] = np.asarray(source)
        try:
            write_npz_atomic(decoded, arrays)
        except OSError:
            pass  # a read-only data root only costs the decode next time
    pool = Split(torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["train_y"]))
    test = Split(torch.from_numpy(arrays["test_x"]), torch.from_numpy(arrays["test_y"]))
    return make_dataset("tinyimagenet", pool, test, int(arrays["num_classes"]))
