"""Where and how a run's units of work execute: one record shared by the driver and every worker.

A unit (train a group of pool models, quantize a group at a plan) is a top-level function
taking a ``RunContext`` first, so it can run in this process or in a Ray worker. The
context loads the data (and whatever a stage memoises with ``loaded``) once per process;
what it has loaded is never pickled, so a worker reloads from the shared cache instead of
receiving arrays over the wire. Every copy of one context that a worker process receives (one
per unit) shares what the others loaded there: a unit finds the pool, the data and the quantizer
(with its memo) that an earlier unit in that process left.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from .allocator import keep_freed_memory
from .data import ImageDataset, load_dataset
from .extensions import load_extensions
from .spec.schema import TaskSpec

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class RunContext:
    spec: TaskSpec
    cache_dir: Path
    data_root: Path | None = None
    download: bool = False
    device: str = "cpu"
    threads: int = field(default_factory=torch.get_num_threads)  # the driver's: same summation order, same bits
    extensions: tuple[str, ...] = ()  # user modules that register datasets, models, quantizers, attacks
    outputs_dir: Path | None = None  # quantized outputs' cache when not under cache_dir
    # Names this run's context in every process it is sent to (copies made with dataclasses.replace keep it).
    token: str = field(default_factory=lambda: uuid.uuid4().hex, repr=False)
    _loaded: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_loaded": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__["_loaded"] = _loaded_in_this_process(self.token)

    def enter(self) -> None:
        """Call first in a unit: a worker computes with the driver's thread count and its extensions."""
        torch.set_num_threads(self.threads)
        keep_freed_memory()
        load_extensions(self.extensions)

    def loaded(self, key: str, load: Callable[[], T]) -> T:
        """``load()`` once per process and context; later calls return the same object."""
        if key not in self._loaded:
            self._loaded[key] = load()
        return self._loaded[key]

    def remember(self, key: str, value: T) -> T:
        """Hand an object the driver already has to the units that run in this process."""
        self._loaded[key] = value
        return value

    @property
    def outputs_root(self) -> Path:
        """The cache folder quantized outputs live under: ``outputs_dir``, else the cache folder."""
        return Path(self.outputs_dir) if self.outputs_dir is not None else self.cache_dir

    def dataset(self) -> ImageDataset:
        return self.loaded("dataset", lambda: load_dataset(self.spec.dataset, self.data_root, self.download))


def worker_threads(workers: int, threads: int | None = None) -> int:
    """One of ``workers`` worker processes' share of ``threads`` (this process's by default), at least one."""
    return max((torch.get_num_threads() if threads is None else threads) // workers, 1)


@contextlib.contextmanager
def threads_of_a_worker(workers: int) -> Iterator[None]:
    """This process computes with one of ``workers`` workers' share of its threads until the block ends: the
    bits a worker process computes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(worker_threads(workers, threads))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# What the copies of the latest context a process received have loaded. One run's at a time: a
# long-lived worker (Ray's) that receives another run's context lets go of the one before.
_RECEIVED: dict[str, dict[str, Any]] = {}


def _loaded_in_this_process(token: str) -> dict[str, Any]:
    if token not in _RECEIVED:
        _RECEIVED.clear()
        _RECEIVED[token] = {}
    return _RECEIVED[token]
