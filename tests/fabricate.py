"""Small files written in the real on-disk formats of the datasets we cannot download here."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def cifar10(root: Path, per_batch: int = 6, test: int = 5, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    written = {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(base / name, "wb") as handle:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n}, handle)
        written["test" if name == "test_batch" else "train"].append((data, labels))
    return written


def cifar100(root: Path, train: int = 12, test: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    written = {}
    for name, n in (("train", train), ("test", test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        with open(base / name, "wb") as handle:
            pickle.dump({b"filenames": [b"x"] * n, b"batch_label": b"b", b"fine_labels": fine,
                         b"coarse_labels": [f // 5 for f in fine], b"data": data}, handle)
        written[name] = (data, fine)
    return written


def idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def fashion_mnist(folder: Path, train: int = 20, test: int = 8, compress: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        idx(folder / name, array, compress)
    return arrays


def tinyimagenet(root: Path, wnids=("n02", "n01", "n03"), per_class: int = 3, val: int = 4, seed: int = 0) -> dict:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    images = {}
    for wnid in wnids:
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=100)
            images[(wnid, i)] = pixels
    lines = []
    for i in range(val):
        wnid = wnids[i % len(wnids)]
        gray = rng.integers(0, 256, (64, 64), dtype=np.uint8)  # TinyImageNet holds some grayscale JPEGs
        Image.fromarray(gray, mode="L").save(base / "val" / "images" / f"val_{i}.JPEG", quality=100)
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return {"wnids": wnids, "val_labels": [sorted(wnids).index(wnids[i % len(wnids)]) for i in range(val)]}
