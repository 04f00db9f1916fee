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
