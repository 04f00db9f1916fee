"""What every benchmark shares: the machine it ran on, waiting for quiet cores, and its saved output.

A benchmark prints through ``say``; ``save`` writes everything said so far under
benchmarks/results/ (atomically), so the file holds exactly what the reader saw.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from mia_ptq_bench.atomic import write_text_atomic
from mia_ptq_bench.environment import processor_name

RESULTS = Path(__file__).parent / "results"
LINES: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def save(name: str) -> Path:
    """Write every line said so far to benchmarks/results/``name``; returns the path."""
    path = RESULTS / name
    write_text_atomic(path, "\n".join(LINES) + "\n")
    print(f"saved {path}")
    return path


def cpu_kernels() -> str:
    """The vector instructions torch's CPU kernels use here (AVX512, AVX2, ...): machines sold
    under one model name differ in it, and it moves every speed in these files."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # torch before 2.0
        return "unknown"


def describe(device: str | torch.device = "cpu") -> str:
    """One line: CPU and its vector kernels, cores, torch and its threads, Python, device."""
    return (f"machine: {processor_name()} ({cpu_kernels()}) · {os.cpu_count()} CPUs · torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads · Python {platform.python_version()} · device {device}")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer reads work done, not work launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device: torch.device, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn``, after one untimed warm-up call."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def gemm_peak(device: torch.device, repeats: int = 10, n: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of the best of ``repeats`` n x n matrix products: the rate every ceiling in these files
    is taken against."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / best_time(lambda: torch.mm(a, b), device, repeats)


def mean_time(fn, device: torch.device, calls: int) -> float:
    """Seconds per call over ``calls`` calls in a row, after one untimed warm-up call: what a step pays
    on average, page faults and all (``best_time`` keeps only the luckiest call)."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def idle_fraction(seconds: float = 1.0) -> float:
    """Share of the CPUs idle over ``seconds`` (Linux /proc/stat; 1.0 elsewhere)."""
    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(values), values[3] + values[4]

    try:
        total, idle = sample()
        time.sleep(seconds)
        total2, idle2 = sample()
    except OSError:
        return 1.0
    return (idle2 - idle) / max(1, total2 - total)


def wait_for_quiet(patience: float) -> float:
    """Wait (up to ``patience`` seconds) until the CPUs are >= 90% idle; return the idle share seen last."""
    deadline = time.time() + patience
    idle = idle_fraction()
    while idle < 0.9 and time.time() < deadline:
        time.sleep(4)
        idle = idle_fraction()
    return idle
