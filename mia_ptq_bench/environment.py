"""What machine and software produced a result."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

import torch

from . import __version__
from .errors import BenchError
from .executor import torch_settings

TRACKED = ("torch", "torchvision", "numpy", "scipy", "scikit-learn", "pydantic", "safetensors")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def usable_device(device: str) -> str:
    """``device`` if torch can compute on it here, else one clear error (before any work starts)."""
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise BenchError(f"--device {device!r}: not a torch device ({str(exc).splitlines()[0][:240]})") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {device!r}: no CUDA device is usable here (torch.cuda.is_available() is False)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise BenchError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type not in ("cpu", "cuda"):
        raise BenchError(f"--device {device!r}: the benchmark runs on cpu or cuda")
    return device


def describe_device(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def processor_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows: two CPUs with the same
    vector extensions can still run other kernels, so a rerun elsewhere cannot promise the same bits."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(device: str | torch.device, quantize_workers: int = 1) -> dict:
    """What a rerun must match to reproduce a result bit for bit (docs/reproducibility.md).

    ``quantize_workers``: the processes the models were quantized and scored in, each with
    ``torch_threads // quantize_workers`` threads (1: in the process that writes the result)."""
    packages = {}
    for name in TRACKED:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = "absent"
    return {"package_version": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "processor": processor_name(), "device": describe_device(device), "packages": packages,
            "torch_threads": torch.get_num_threads(), "quantize_workers": quantize_workers,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "torch_settings": recorded_torch_settings()}


def recorded_torch_settings() -> dict[str, str | bool]:
    """The process's torch settings that can change float results, as a result records them: those a worker
    process or Ray task is handed (``executor.torch_settings``: default dtype, deterministic algorithms, float32
    precision per backend, cuDNN's and oneDNN's switches, flushing denormals), so they are the settings the run quantized and scored under. (Not
    necessarily the pool's: a pool is cached by its task alone, and may have been trained, or pulled, under others.)"""
    return {name: value if isinstance(value, bool) else str(value) for name, value in torch_settings().items()}
