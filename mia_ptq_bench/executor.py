"""Where units of work run: in this process, in worker processes here, or as Ray tasks on a Ray cluster.

A unit is a top-level function of one picklable argument that writes its result into the
content-addressed cache and returns a short summary. Running units through an executor
therefore never changes results: the driver reads the same cache files either way. Ray
retries a failed unit (``max_retries``) and a unit that still fails is reported with its
error, never dropped; a unit that refused its input (a BenchError: bad data, a corrupted
cache file) would refuse it again, so it is reported at once, not retried. On a cluster, the
cache and data folders must be shared storage.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from .errors import BenchError
from .progress import Progress, SilentProgress

T = TypeVar("T")


class Executor(Protocol):
    def map(self, unit: Callable[[T], Any], jobs: Sequence[T], *, gpus: float = 0, describe: Callable[[T], str] = str,
            progress: Progress | None = None, key: str = "") -> list[Any]: ...


class LocalExecutor:
    """Runs units one after another in this process."""

    name = "local"

    def map(self, unit, jobs, *, gpus: float = 0, describe=str, progress=None, key: str = "") -> list[Any]:
        progress = progress or SilentProgress()
        results = []
        for job in jobs:
            results.append(unit(job))
            if key:
                progress.advance(key)
        return results


class ProcessExecutor:
    """Runs units in ``workers`` fresh processes on this machine, at most one unit per process at a time.

    On a CPU with few cores, two processes of one thread each got more done than one process with
    both threads (pool/train.py ``auto_workers`` has the numbers): each runs its own operations
    with no thread ever waiting for the other at the end of one. Processes are started
    (``spawn``) rather than forked, as a fork of a process that has run OpenMP can hang; each
    imports the package afresh, a few seconds once per worker. The first unit that fails stops
    the map, and its error is raised as the unit raised it; a worker that dies (killed, out of
    memory) is reported as such. A failure or an interrupt ends the units still running.
    """

    name = "processes"

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise BenchError(f"worker processes: {workers}; need at least 1")
        self.workers = workers

    def map(self, unit, jobs, *, gpus: float = 0, describe=str, progress=None, key: str = "") -> list[Any]:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

        progress = progress or SilentProgress()
        results: list[Any] = [None] * len(jobs)
        pool = ProcessPoolExecutor(min(self.workers, max(len(jobs), 1)), mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_end_with_the_driver)
        try:
            pending = {pool.submit(unit, job): i for i, job in enumerate(jobs)}
            while pending:
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    try:
                        results[index] = future.result()
                    except BrokenProcessPool:
                        raise BenchError(f"{describe(jobs[index])}: a worker process died (killed, or out of memory? "
                                         "or a script that starts workers without an `if __name__ == \"__main__\":` "
                                         "guard); what the units finished is kept, and a rerun goes on from there") from None
                    if key:
                        progress.advance(key)
        except BaseException:
            # A failure or Ctrl-C stops the others now rather than after their units (minutes, maybe): every
            # write is atomic, so a killed unit leaves nothing half-written, and a rerun redoes only it.
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return results


def _end_with_the_driver() -> None:
    """In a worker: be terminated when the process that started it ends, even by SIGKILL, rather than finish
    a unit nobody waits for (Linux; elsewhere a worker ends after its unit)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        import multiprocessing

        driver = multiprocessing.parent_process()
        if driver is not None and os.getppid() != driver.pid:  # it ended before the signal was asked for
            os._exit(1)


class RayExecutor:
    """Runs units as Ray tasks; starts a local Ray (``num_cpus``) unless given a cluster address."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, max_retries: int = 2) -> None:
        try:
            import ray
        except ImportError:
            raise BenchError("--executor ray needs Ray: pip install 'ray>=2.9' (or pip install -e '.[ray]')") from None
        self.ray = ray
        self.max_retries = max_retries
        if not ray.is_initialized():
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                kwargs["address"] = address
            else:  # a local Ray: keep all its traffic on the loopback interface
                kwargs.update(num_cpus=num_cpus or os.cpu_count(), _node_ip_address="127.0.0.1")
            ray.init(**kwargs)

    def map(self, unit, jobs, *, gpus: float = 0, describe=str, progress=None, key: str = "") -> list[Any]:
        progress = progress or SilentProgress()
        # Ray wraps only plain functions; the unit (often a functools.partial) travels as an argument
        remote = self.ray.remote(num_cpus=1, num_gpus=gpus, max_retries=self.max_retries,
                                 retry_exceptions=True)(_apply)
        unit_ref = self.ray.put(unit)
        pending = {remote.remote(unit_ref, job): i for i, job in enumerate(jobs)}
        results: list[Any] = [None] * len(jobs)
        failures = []
        while pending:
            done, _ = self.ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                try:
                    result = self.ray.get(ref)
                except Exception as exc:  # after Ray's retries: report, never drop
                    cause = getattr(exc, "cause", None) or exc
                    failures.append((index, f"{describe(jobs[index])}: {type(cause).__name__}: {cause}"))
                else:
                    if isinstance(result, _Refused):
                        failures.append((index, f"{describe(jobs[index])}: {result.reason} (not retried)"))
                    results[index] = result
                if key:
                    progress.advance(key)
        if failures:
            raise BenchError(f"{len(failures)} of {len(jobs)} Ray tasks failed after {self.max_retries} retries: "
                             + "; ".join(text for _, text in sorted(failures)))  # in job order, however they ended
        return results


class _Refused:
    """A unit's BenchError, returned instead of raised so that Ray does not retry it."""

    def __init__(self, error: BenchError) -> None:
        self.reason = f"{type(error).__name__}: {error}"


def _apply(unit, job):
    try:
        return unit(job)
    except BenchError as exc:
        return _Refused(exc)


def make_executor(name: str, address: str | None = None) -> Executor:
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address)
    raise BenchError(f"unknown executor {name!r}; choose local or ray")
