"""Reading the CIFAR releases' python pickles without running what a pickle names.

Unpickling calls whatever global the file names, with arguments and a state the file chooses, so
a batch may name only what numpy arrays of any pickle protocol are rebuilt from, and even those
never reach numpy as named: ``numpy.dtype`` with a crafted state (its flags) makes numpy read an
array's raw bytes as object pointers. Stand-ins take their place instead. A dtype is made from a
plain numeric type code (of its state, only the byte order is read), and an array from its raw
bytes with ``np.frombuffer``, after checking that shape, type and length agree. Protocols 0-5 and
the Python 2 release's own pickles load this way (numpy 1.x and 2.x module paths alike).
"""

from __future__ import annotations

import codecs
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np


class Refused(ValueError):
    """What the pickle asked for, that a CIFAR batch never needs."""


_NDARRAY = object()  # what the pickle's `numpy.ndarray` becomes: only ever passed to _reconstruct


class _Dtype:
    """Stands in for ``numpy.dtype(code, align, copy)`` and its ``__setstate__``."""

    def __init__(self, code: Any, align: Any = False, copy: Any = True) -> None:
        if isinstance(code, bytes):  # a Python 2 str, read with encoding="bytes"
            code = code.decode("ascii", "replace")
        try:
            dtype = np.dtype(code) if isinstance(code, str) else None
        except TypeError:
            dtype = None
        if dtype is None or dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
            raise Refused(f"an array of type {code!r} (only plain numbers are read)")
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else "|"
        order = order.decode("ascii", "replace") if isinstance(order, bytes) else order
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)
        elif order not in ("|", "="):
            raise Refused(f"a dtype with byte order {order!r}")


def _array(raw: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    if not isinstance(dtype, _Dtype):
        raise Refused("an array whose type is not a dtype")
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
        raise Refused(f"an array of shape {shape!r}")
    if isinstance(raw, memoryview):
        raw = raw.tobytes()
    if not isinstance(raw, (bytes, bytearray)):
        raise Refused(f"an array whose data is a {type(raw).__name__}, not bytes")
    count = math.prod(shape)
    if count * dtype.dtype.itemsize != len(raw):
        raise Refused(f"an array of shape {shape} and type {dtype.dtype} with {len(raw)} bytes of data")
    return np.frombuffer(raw, dtype.dtype, count).reshape(shape, order=order).copy()


class _Array:
    """Stands in for ``_reconstruct(ndarray, ...)``, the array that BUILD then hands its state to."""

    array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise Refused("an array state numpy does not write")
        _, shape, dtype, fortran, raw = state
        self.array = _array(raw, dtype, shape, "F" if fortran else "C")


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _Array:
    if cls is not _NDARRAY:
        raise Refused("an array of another class than numpy.ndarray")
    return _Array()


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if order not in ("C", "F"):
        raise Refused(f"an array in order {order!r}")
    return _array(buffer, dtype, shape, order)


_GLOBALS = {
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _reconstruct for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _frombuffer for core in ("core", "_core")},
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Dtype,
    ("_codecs", "encode"): codecs.encode,  # how python 3 writes bytes at protocols 0-2
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _GLOBALS[module, name]
        except KeyError:
            raise Refused(f"it calls {module}.{name}, which no CIFAR batch needs (a pickle can run any code "
                          "it names)") from None


# List and dict items a batch may hold in all: a CIFAR-100 training batch has about 150,000 (labels
# and file names).
MAX_ITEMS = 1_000_000


def _unwrapped(root: Any) -> Any:
    """``root`` with every array stand-in replaced by its array.

    A batch is a dict of arrays, lists of numbers or names, and names: a list or dict any deeper is
    refused. Besides never being needed, nesting is how a small pickle grows: each level of a nest of
    shared references doubles what rebuilding it, or numpy reading it, must walk."""
    items = 0

    def unwrap(value: Any, depth: int) -> Any:
        nonlocal items
        if isinstance(value, _Array):
            if value.array is None:
                raise Refused("an array without its data")
            return value.array
        if isinstance(value, _Dtype) or value is _NDARRAY:
            raise Refused("a numpy part outside an array")
        if not isinstance(value, (dict, list)):
            return value
        if depth > 1:
            raise Refused("a list or dict inside another's values (a batch's lists hold numbers and names)")
        items += len(value)
        if items > MAX_ITEMS:
            raise Refused(f"more than {MAX_ITEMS:,} list and dict items")
        if isinstance(value, dict):
            return {key: unwrap(item, depth + 1) for key, item in value.items()}
        return [unwrap(item, depth + 1) for item in value]

    return unwrap(root, 0)


def load_batch(path: Path) -> Any:
    """The unpickled content of ``path`` (bytes keys, as the release's Python 2 pickles have them);
    Refused if it names anything but numeric numpy arrays."""
    with open(path, "rb") as handle:
        return _unwrapped(_Unpickler(handle, encoding="bytes").load())
