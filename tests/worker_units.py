"""Units for tests of worker processes: a module that imports little, so that each worker starts fast."""

from __future__ import annotations

import os


def raises_bench_error(job: int) -> int:
    from mia_ptq_bench.errors import BenchError

    if job == 2:
        raise BenchError("two: refused input")
    return job * job


def dies(job: int) -> int:
    if job == 1:
        os._exit(9)  # as a worker the kernel killed would: no exception, no result
    return job


def sees_the_first_reported(job: tuple[str, int]) -> bool:
    """Job 0 ends at once; job 1 waits (up to 30 s) for the file the driver writes on hearing that job 0 ended."""
    import time
    from pathlib import Path

    flag, index = Path(job[0]), job[1]
    if index == 0:
        return True
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if flag.exists():
            return True
        time.sleep(0.05)
    return False


def writes_its_pid_then_sleeps(folder: str) -> None:
    import time
    from pathlib import Path

    (Path(folder) / f"{os.getpid()}.pid").write_text("")
    time.sleep(120)


_HANDED: list[str] = []
_JOBS: list[str] = []


def hand(value: str) -> None:
    """A worker's setup: keep ``value`` for the units that run in this process."""
    _HANDED.append(value)


def counts_its_jobs(job: str) -> tuple[int, int, list[str]]:
    """This process's id, how many jobs it has run (this one included) and what its setup was handed."""
    _JOBS.append(job)
    return os.getpid(), len(_JOBS), list(_HANDED)


def torch_settings_here(job: int) -> dict:
    from mia_ptq_bench.executor import torch_settings

    return torch_settings()
