"""keep_freed_memory: freed blocks stay in the process (glibc), so the next step reuses them."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
import os, sys, torch
if sys.argv[1] == "keep":
    from mia_ptq_bench.allocator import keep_freed_memory
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
page = os.sysconf("SC_PAGE_SIZE")
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * page
before = resident()
block = torch.ones(16 << 20)  # 64 MiB, touched
del block
print(resident() - before)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_memory_stays_in_the_process_only_when_asked() -> None:
    def kept_after_free(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return int(done.stdout.split()[-1])

    assert kept_after_free("default") < 16 << 20  # glibc unmapped the 64 MiB block when it was freed
    assert kept_after_free("keep") >= 60 << 20  # kept for reuse: no page faults next time
