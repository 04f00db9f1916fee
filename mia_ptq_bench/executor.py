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

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from .allocator import c_library
from .errors import BenchError
from .progress import Progress, SilentProgress

T = TypeVar("T")


class Executor(Protocol):
    """``slots``: one number per job; jobs of equal slots are best run where the other ran (only
    ``ResidentProcesses`` keeps processes to do so; the others ignore it)."""

    def map(self, unit: Callable[[T], Any], jobs: Sequence[T], *, gpus: float = 0, describe: Callable[[T], str] = str,
            progress: Progress | None = None, key: str = "", slots: Sequence[int] | None = None) -> list[Any]: ...


class LocalExecutor:
    """Runs units one after another in this process."""

    name = "local"

    def map(self, unit, jobs, *, gpus: float = 0, describe=str, progress=None, key: str = "", slots=None) -> list[Any]:
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

    def map(self, unit, jobs, *, gpus: float = 0, describe=str, progress=None, key: str = "", slots=None) -> list[Any]:
        pool = _worker_pool(min(self.workers, max(len(jobs), 1)))
        try:
            return _gather([pool.submit(unit, job) for job in jobs], jobs, describe, progress, key, [pool])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class ResidentProcesses:
    """``workers`` processes kept for a whole run: the job of slot s (its position if no slots are given)
    runs in process s mod ``workers``.

    For work that is cheaper where it was done before: each process keeps what its units load
    (``RunContext.loaded``, shared by every copy of one context in a process), so a unit that comes
    back to the same process finds its data, its pool and its quantizer with that quantizer's
    memo of the plans before (quantize/memo.py). The runner hands each group of models to the same
    position in every plan's map, so a group always returns to the process that did it before.
    Processes start (``spawn``) at their first job and end with ``close``, or at once when a unit
    fails, a worker dies or the run is interrupted (then the object cannot be used again).
    """

    name = "processes"

    def __init__(self, workers: int, setup: Callable[[], Any] | None = None) -> None:
        """``setup``: called first in each process (e.g. to hand it what the driver has loaded)."""
        if workers < 1:
            raise BenchError(f"worker processes: {workers}; need at least 1")
        self.workers = workers
        self._pools = [_worker_pool(1, setup) for _ in range(workers)]
        self._ended = False

    def map(self, unit, jobs, *, gpus: float = 0, describe=str, progress=None, key: str = "", slots=None) -> list[Any]:
        if self._ended:
            raise BenchError("worker processes: already ended (closed, or stopped by an earlier failure)")
        from concurrent.futures.process import BrokenProcessPool

        try:
            places = range(len(jobs)) if slots is None else slots
            futures = []
            for place, job in zip(places, jobs, strict=True):
                try:
                    futures.append(self._pools[place % self.workers].submit(_after_setup, unit, job))
                except BrokenProcessPool:  # it died between maps (killed, out of memory)
                    raise BenchError(f"{describe(job)}: {DIED}") from None
            return _gather(futures, jobs, describe, progress, key, self._pools)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._ended = True
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ResidentProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


DIED = ("a worker process died (killed, or out of memory? or a script that starts workers without an "
        "`if __name__ == \"__main__\":` guard); what the units finished is kept, and a rerun goes on from there")


def _worker_pool(workers: int, setup: Callable[[], Any] | None = None):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(setup, torch_settings()))


# Process-wide torch settings that can change a computation's bits. A spawned worker starts from torch's
# defaults, so the driver's are handed to it (the thread count each unit sets), and to every Ray task.
_TORCH_SETTINGS = {  # name: torch's getter
    "default_dtype": "get_default_dtype",
    "deterministic": "are_deterministic_algorithms_enabled",
    "deterministic_warn_only": "is_deterministic_algorithms_warn_only_enabled",
}
_BACKEND_FLAGS = ("cudnn.enabled", "cudnn.deterministic", "cudnn.benchmark", "mkldnn.enabled", "mkldnn.deterministic")
# Float32 precision (TF32, bf16) per backend and operation, as torch keeps it: a level set is copied down to
# the ones below it, so they are applied general ones first. Read and written through torch._C, since the public
# torch.backends.mkldnn.fp32_precision reads oneDNN's level but writes the general one.
_PRECISIONS = (("generic", "all"), ("mkldnn", "all"), ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"),
               ("cuda", "all"), ("cuda", "matmul"), ("cuda", "conv"), ("cuda", "rnn"))


def torch_settings() -> dict[str, Any]:
    """This process's values of the torch settings a worker takes over (``apply_torch_settings``); a setting
    this torch does not have is left out."""
    import torch

    settings = {name: getattr(torch, getter)() for name, getter in _TORCH_SETTINGS.items()}
    settings["flush_denormal"] = _flushes_denormals()
    # The one value set_float32_matmul_precision keeps beside the per-backend ones (on CUDA a worker whose two
    # disagree fails at its first matmul); torch refuses to read it once they disagree, and so left out.
    with contextlib.suppress(RuntimeError):
        settings["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    for flag in _BACKEND_FLAGS:
        found = _backend_flag(torch, flag)
        if found is not None:
            settings[flag] = getattr(*found)
    if hasattr(torch._C, "_get_fp32_precision_getter"):
        for backend, operation in _PRECISIONS:
            with contextlib.suppress(RuntimeError, ValueError):
                value = torch._C._get_fp32_precision_getter(backend, operation)
                settings[f"fp32_precision.{backend}.{operation}"] = value
    return settings


def apply_torch_settings(settings: dict[str, Any]) -> None:
    """Take over ``settings`` (``torch_settings()`` of another process); a torch that cannot hold them all (another
    version, on a remote Ray node say) is refused, since it would not compute the same bits anyway."""
    import torch

    torch.set_default_dtype(settings["default_dtype"])
    if "flush_denormal" in settings:
        torch.set_flush_denormal(settings["flush_denormal"])  # False where the CPU cannot: the check below says so
    deterministic = (settings["deterministic"], settings["deterministic_warn_only"])
    # Only where it differs: the call also resets inductor's own deterministic switch.
    if deterministic != (torch.are_deterministic_algorithms_enabled(),
                         torch.is_deterministic_algorithms_warn_only_enabled()):
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    for flag in _BACKEND_FLAGS:
        if flag in settings:
            found = _backend_flag(torch, flag)
            if found is None:  # setattr would only add an attribute nothing reads
                raise BenchError(f"torch {torch.__version__} here has no torch.backends.{flag}")
            setattr(*found, settings[flag])
    if "float32_matmul_precision" in settings:  # before the per-backend values, which it would overwrite
        torch.set_float32_matmul_precision(settings["float32_matmul_precision"])
    per_backend = any(key.startswith("fp32_precision.") for key in settings)
    if per_backend and not hasattr(torch._C, "_set_fp32_precision_setter"):
        raise BenchError(f"torch {torch.__version__} here has no per-backend float32 precision")
    for backend, operation in _PRECISIONS:  # general ones first
        key = f"fp32_precision.{backend}.{operation}"
        if key in settings:
            torch._C._set_fp32_precision_setter(backend, operation, settings[key])
    held = torch_settings()
    if held != settings:
        differing = sorted(k for k in held.keys() | settings.keys() if held.get(k, "absent") != settings.get(k, "absent"))
        raise BenchError(f"torch {torch.__version__} here does not hold the settings handed over: "
                         + ", ".join(f"{k} {held.get(k, 'absent')!r} (handed {settings.get(k, 'absent')!r})"
                                     for k in differing[:4]))


def _flushes_denormals() -> bool:
    """Whether this thread flushes denormal floats to zero (``torch.set_flush_denormal``, which has no getter):
    a denormal float32 multiplied by one comes out as zero only then."""
    import torch

    return bool((torch.full((1,), 1e-40, dtype=torch.float32, device="cpu") * 1.0).item() == 0.0)


def _backend_flag(torch: Any, flag: str) -> tuple[Any, str] | None:
    """The object holding ``torch.backends.<flag>`` and the attribute's name; None where this torch has no such flag."""
    *path, attribute = f"backends.{flag}".split(".")
    owner = torch
    for part in path:
        owner = getattr(owner, part, None)
    return (owner, attribute) if owner is not None and hasattr(owner, attribute) else None


# In a worker: why its setup failed, reported by its first unit (an initializer's exception would only
# break the pool, which reads as a worker that died).
_SETUP_FAILED: list[str] = []


def _start_worker(setup: Callable[[], Any] | None, settings: dict[str, Any]) -> None:
    _end_with_the_driver()
    try:
        apply_torch_settings(settings)
        if setup is not None:
            setup()
    except Exception as exc:  # noqa: BLE001 - any failure: reported by the units, in one line
        _SETUP_FAILED.append(_one_line(exc))


def _one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def _after_setup(unit, job):
    if _SETUP_FAILED:
        raise BenchError(f"a worker process could not start: {_SETUP_FAILED[0]}")
    return unit(job)


def _gather(futures: list, jobs: Sequence, describe: Callable[[Any], str], progress: Progress | None, key: str,
            pools: list) -> list[Any]:
    """The futures' results in job order, advancing ``key`` as each ends; the first failure is raised (a dead
    worker as one BenchError) after every process of ``pools`` is ended."""
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    progress = progress or SilentProgress()
    results: list[Any] = [None] * len(jobs)
    try:
        pending = {future: i for i, future in enumerate(futures)}
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for future in done:
                index = pending.pop(future)
                try:
                    results[index] = future.result()
                except BrokenProcessPool:
                    raise BenchError(f"{describe(jobs[index])}: {DIED}") from None
                if key:
                    progress.advance(key)
    except BaseException:
        # A failure or Ctrl-C stops the others now rather than after their units (minutes, maybe): every
        # write is atomic, so a killed unit leaves nothing half-written, and a rerun redoes only it.
        for pool in pools:
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
        raise
    return results


def _end_with_the_driver() -> None:
    """In a worker: be terminated when the process that started it ends, even by SIGKILL, rather than finish
    a unit nobody waits for (Linux; elsewhere a worker ends after its unit)."""
    if sys.platform.startswith("linux"):
        try:
            c_library(use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
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

    def map(self, unit, jobs, *, gpus: float = 0, describe=str, progress=None, key: str = "", slots=None) -> list[Any]:
        progress = progress or SilentProgress()
        # Ray wraps only plain functions; the unit (often a functools.partial) travels as an argument
        remote = self.ray.remote(num_cpus=1, num_gpus=gpus, max_retries=self.max_retries,
                                 retry_exceptions=True)(_apply)
        unit_ref = self.ray.put(unit)
        # A Ray worker may have run other work, or come up with torch's defaults: each task takes the
        # driver's settings first, as a local worker process does when it starts.
        settings = torch_settings()
        pending = {remote.remote(unit_ref, settings, job): i for i, job in enumerate(jobs)}
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


def _apply(unit, settings, job):
    try:
        apply_torch_settings(settings)
    except Exception as exc:  # noqa: BLE001 - another torch on a remote node, say: the same for every retry
        return _Refused(BenchError(f"the Ray worker could not take the driver's torch settings: {_one_line(exc)}"))
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
