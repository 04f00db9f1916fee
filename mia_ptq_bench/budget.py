"""What a task will cost, estimated before any data is loaded or any model trained: memory, disk, time.

A task file is input like any other: ``n_models: 1024`` with ``hidden: [65536]`` validates field by
field, and would then fill the memory or the disk hours into a run. The estimate builds the model on
PyTorch's ``meta`` device (shapes only, nothing allocated), counts its parameters, the activations
of one example and the floating-point operations of one forward pass, and multiplies out the pool,
the score arrays (M x N x Q float64), the training schedules and what is written to disk. A task
is refused, with the estimate, when it needs more memory than the machine has (or more disk than is
free where the cache lives), or more computation than a year of a very fast accelerator.

The numbers are estimates within a small factor, meant to catch the absurd, not to plan a cluster.
The quantization methods' own work (reconstruction, Hessians) is not counted. Local worker processes
(pool training, quantization: ``--workers``, or those the automatic choices would start) each hold the
data and the pool's scores twice (as handed, pickled, and unpickled), and the driver holds about two
pickled copies while it hands them out.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .attack import THREAT_MODELS
from .data import DATASET_SHAPES, DatasetShape, ImageDataset, oversized_subset
from .errors import SpecError
from .limits import size_text
from .models import build_meta_model
from .models.structure import check_quantizable
from .pool import PoolStore
from .pool.train import MAX_STACK, MEMORY_SHARE, auto_workers, check_batch_trains, pool_training_work, \
    training_flops
from .spec.plans import PrecisionPlan
from .spec.schema import TaskSpec

# Assumed sustained throughput, for the time estimate only: a CPU thread running convolutions and
# matrix products, and a current datacenter GPU under bfloat16 autocast.
CPU_FLOPS_PER_THREAD = 1e10
CUDA_FLOPS = 5e13
# Absurd anywhere: more than a year at a petaflop per second.
FASTEST_FLOPS = 1e15
MAX_SECONDS = 365 * 24 * 3600
SCHEDULE_BYTES = 8 + 16 + 1  # per scheduled image: pool index (int64), crop offsets (2 x int64), flip (bool)
INFERENCE_BATCH = 1024  # inference/predict.py


@dataclass(frozen=True)
class Machine:
    device: str
    memory: int | None  # bytes of RAM this process may use (None: unknown)
    device_memory: int | None  # bytes on the accelerator (None on a CPU)
    free_disk: int | None  # bytes free where the cache lives
    flops: float  # assumed FLOP/s of the device

    @classmethod
    def current(cls, device: str, cache_dir: Path) -> Machine:
        kind = torch.device(device).type
        device_memory = None
        if kind == "cuda" and torch.cuda.is_available():
            device_memory = torch.cuda.get_device_properties(torch.device(device)).total_memory
        flops = CUDA_FLOPS if kind == "cuda" else CPU_FLOPS_PER_THREAD * torch.get_num_threads()
        return cls(kind, _memory(), device_memory, _free_disk(Path(cache_dir)), flops)


def _memory() -> int | None:
    """Physical memory, or the container's limit when it is lower (cgroup v2, then v1)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def _free_disk(folder: Path) -> int | None:
    """Free bytes on the file system that will hold ``folder`` (its nearest existing ancestor)."""
    for candidate in (folder.absolute(), *folder.absolute().parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


@dataclass(frozen=True)
class ModelSize:
    parameters: int
    forward_flops: float  # one example, one forward pass
    activations: int  # values the layers output for one example (about what autograd keeps for backward)
    largest: int  # values of the largest layer output for one example (what inference holds at a time)
    training_flops: float  # one example, forward and backward (pool/train.py training_flops)


def measure_model(spec: TaskSpec, input_shape: tuple[int, int, int], classes: int) -> ModelSize:
    """Build the task's model on the ``meta`` device and run one example through it: shapes only.

    The same pass on two examples checks the layers as the quantizers need them (``check_quantizable``),
    so ``validate`` refuses such a model before anything is allocated or trained."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_meta_model(spec.model, input_shape, classes)
    model.eval()
    activations = [0, 0]

    def count(_module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            activations[0] += output.numel()
            activations[1] = max(activations[1], output.numel())

    def cannot_run(exc: Exception) -> SpecError:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return SpecError(f"model: {spec.model.arch} cannot run on {input_shape[1]}x{input_shape[2]} images with "
                         f"{input_shape[0]} channel(s): {first}")

    hooks = [m.register_forward_hook(count) for m in model.modules() if not any(True for _ in m.children())]
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.empty((1, *input_shape), device="meta"))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise cannot_run(exc) from None
    finally:
        for hook in hooks:
            hook.remove()
    try:
        trained = training_flops(model, input_shape)  # a training step too: its loss and backward
    except (RuntimeError, ValueError, TypeError) as exc:
        raise cannot_run(exc) from None
    check_batch_trains(model, spec.training.batch_size, input_shape, spec.model.arch)
    check_quantizable(model, torch.empty((2, *input_shape), device="meta"))
    parameters = sum(p.numel() for p in model.parameters())
    return ModelSize(parameters, float(counter.get_total_flops()), activations[0], activations[1], trained)


@dataclass(frozen=True)
class Budget:
    model: ModelSize
    memory: int  # peak bytes in host memory (on a CPU, training included)
    device_memory: int  # bytes of the models trained together, on the accelerator
    disk: int  # bytes the pool, quantized outputs and results take that are not cached yet
    flops: float  # training, scoring and attacking; the quantizer's own work not counted
    memory_parts: dict[str, int]

    def seconds(self, machine: Machine) -> float:
        return self.flops / machine.flops

    def summary(self, machine: Machine) -> str:
        parts = ", ".join(f"{name} {size_text(n)}" for name, n in self.memory_parts.items())
        return (f"about {size_text(self.memory)} of memory ({parts}), {size_text(self.disk)} of disk, "
                f"{self.flops:.1e} FLOP ≈ {_duration(self.seconds(machine))} on {machine.device} at an assumed "
                f"{machine.flops / 1e9:g} GFLOP/s; {self.model.parameters:,} parameters per model")


def _duration(seconds: float) -> str:
    for unit, size in (("years", 365 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} seconds"


def known_shape(spec: TaskSpec) -> DatasetShape | None:
    return DATASET_SHAPES.get(spec.dataset.name)


def estimate(spec: TaskSpec, raw: DatasetShape, device: str, quantized_per_plan: int, plans: int,
             results: int, pool_cached: bool = False, workers: int | None = 1,
             quantize_grid: tuple[int, int] | None = None) -> Budget:
    """Memory, disk and operations of one evaluation of ``spec`` on a dataset shaped ``raw``, run in
    ``workers`` local processes (None: as many as the automatic choices would start; see
    ``worker_processes``). ``quantize_grid``: for a method that runs long, the plans of the task's grid it
    serves and the models each quantizes (``runner.grid_extent``), from which its scoring workers are chosen."""
    d = spec.dataset
    n_pool = min(d.pool_size or raw.pool, raw.pool)
    n_test = min(d.test_size or raw.test, raw.test)
    _, side_h, side_w = shape = raw.model_input(d.image_size)
    pixels = raw.channels * side_h * side_w
    model = measure_model(spec, shape, raw.classes)

    m, q, t = spec.membership.n_models, len(spec.queries), spec.targets.count
    members = round(n_pool * spec.membership.pkeep)
    batch = spec.training.batch_size
    steps = spec.training.epochs * max(1, math.ceil(members / batch))
    # pool/train.py auto_stack: on a CPU up to MAX_STACK models train as one, as many as fit in
    # MEMORY_SHARE of the memory; on an accelerator one at a time
    per_model = 16 * model.parameters + 4 * model.activations * batch + 4 * batch * pixels
    if torch.device(device).type == "cpu":
        memory_total = _memory()
        fit = int(MEMORY_SHARE * memory_total // max(per_model, 1)) if memory_total else MAX_STACK
        together = max(1, min(MAX_STACK, m, fit))
    else:
        together = 1
    scores = m * n_pool * q * 8
    adaptive = quantized_per_plan >= m

    # Host memory at the peak: the raw splits and their resized copies, the pool's score arrays (and the
    # attack's working copies: LiRA sorts masked copies of the shadow scores), the masks, the schedules.
    raw_bytes = (raw.pool + raw.test) * raw.channels * raw.height * raw.width
    resize_bytes = 4 * n_pool * raw.channels * (raw.height * raw.width + side_h * side_w) if d.image_size else 0
    parts = {
        "data": raw_bytes + resize_bytes + (n_pool + n_test) * pixels,
        "scores": scores * (6 if adaptive else 5) + m * n_pool,
        "schedules": together * steps * batch * SCHEDULE_BYTES,
    }
    scored = n_pool * q + n_test
    # As build_pool counts it, so that the copies counted are those of the training workers that start
    training_work = pool_training_work(spec, n_pool, model.training_flops)
    scoring_flops = model.forward_flops * scored * plans * quantized_per_plan
    if workers is None:
        workers = worker_processes(device, 0 if pool_cached else training_work,
                                   scoring_work(model.forward_flops, n_pool, q, quantize_grid))
    if workers > 1:
        # A copy: both splits' images and labels (the test split twice: the pool's, and the evaluation's
        # own), the pool's scores and masks.
        copy = (n_pool + 2 * n_test) * (pixels + 8) + scores + m * n_pool
        parts[f"copies for {workers} worker processes"] = (2 * workers + 2) * copy
    # The models trained together: weights, gradients, momentum and a stacked copy, plus one batch's
    # activations kept for the backward pass; inference holds a layer's input and output for 1024 images.
    training = together * per_model
    inference = 2 * 4 * model.largest * INFERENCE_BATCH + 4 * n_pool * raw.classes
    on_device = training + inference
    if torch.device(device).type == "cuda":
        device_memory = on_device + (n_pool + n_test) * pixels  # the dataset is resident on the accelerator
    else:
        parts["training"] = on_device
        device_memory = 0
    memory = sum(parts.values())

    pool_disk = 0 if pool_cached else m * (4 * model.parameters + n_pool * q * 8 + 1024) + m * n_pool
    quantized_disk = plans * quantized_per_plan * (n_pool * q * 8 + n_test * 8 + 4096)
    attacks = len(spec.attacks)
    result_disk = results * (scores + m * n_pool + 2 * t * n_pool * (q + attacks) * 8 + 2 * t * n_test * 8)
    disk = pool_disk + quantized_disk + result_disk

    flops = training_work + model.forward_flops * scored * m + scoring_flops  # training; scoring every model
    return Budget(model, memory, device_memory, disk, flops, parts)


def scoring_work(forward_flops: float, pool_images: int, queries: int, grid: tuple[int, int] | None) -> float:
    """The FLOP by which a long method's scoring workers are chosen: a forward pass per pool image and query
    for every model of its ``grid`` (plans, models per plan); 0 for a method that does not run long (None).
    The budget and the runner (``runner.quantize_workers``) both take it, on the model's forward FLOP as
    ``measure_model`` counts them, so the copies counted are those of the workers that start."""
    if grid is None:
        return 0.0
    plans, models = grid
    return plans * models * pool_images * queries * forward_flops


def worker_processes(device: str, training_flops: float, quantizing_flops: float) -> int:
    """The local processes the automatic choices start for that much pool training and quantization (scoring):
    ``pool/train.py auto_workers``, which pool building and ``runner.quantize_workers`` both use."""
    kind, threads = torch.device(device), torch.get_num_threads()
    return max(auto_workers(kind, threads, training_flops), auto_workers(kind, threads, quantizing_flops))


def problems(budget: Budget, machine: Machine) -> list[str]:
    """Why the machine cannot run this, one line each ("budget: ..."); empty when it can."""
    found = []
    if machine.memory is not None and budget.memory > machine.memory:
        parts = ", ".join(f"{name} {size_text(n)}" for name, n in budget.memory_parts.items())
        copies = next((n for name, n in budget.memory_parts.items() if name.startswith("copies for")), 0)
        hint = " (--workers 1 keeps one copy)" if copies and budget.memory - copies <= machine.memory else ""
        found.append(f"budget: needs about {size_text(budget.memory)} of memory ({parts}), "
                     f"this machine has {size_text(machine.memory)}{hint}")
    if machine.device_memory is not None and budget.device_memory > machine.device_memory:
        found.append(f"budget: the models trained together need about {size_text(budget.device_memory)} on "
                     f"{machine.device}, which has {size_text(machine.device_memory)}")
    if machine.free_disk is not None and budget.disk > machine.free_disk:
        found.append(f"budget: needs about {size_text(budget.disk)} of disk for the pool, quantized outputs and "
                     f"results, {size_text(machine.free_disk)} is free")
    if budget.flops > FASTEST_FLOPS * MAX_SECONDS:
        found.append(f"budget: about {budget.flops:.1e} floating-point operations, more than a year even at "
                     f"{FASTEST_FLOPS:.0e} FLOP/s ({_duration(budget.seconds(machine))} on {machine.device})")
    return found


def check_budget(spec: TaskSpec, device: str, cache_dir: Path, *, plans: list[str] | None = None,
                 threat_models: list[str] | None = None, dataset: Callable[[], ImageDataset] | None = None,
                 source: str | None = None, workers: int | None = None,
                 quantize_grid: tuple[int, int] | None = None) -> Budget | None:
    """Estimate the evaluation of ``spec`` and refuse it (SpecError, one line per reason) when absurd here.

    The dataset's shape comes from DATASET_SHAPES; a dataset that registers none is loaded (``dataset``)
    to be measured, or, without a loader, the estimate is skipped (returns None). ``workers``: the local
    processes asked for (None: those the automatic choices would start; 1 where the units run elsewhere,
    as Ray's do). ``quantize_grid``: see ``estimate``.
    """
    where = source or spec.id
    raw = known_shape(spec)
    if raw is None:
        if dataset is None:
            return None
        raw = DatasetShape.of(dataset())
    problem = oversized_subset(spec.dataset, raw.pool, raw.test)
    if problem:
        raise SpecError(f"{where}: {problem}")
    plan_list = [PrecisionPlan.parse(p) for p in (plans or spec.plans)]
    threats = [THREAT_MODELS.get(name) for name in (threat_models or spec.threat_models)]
    quantized = [p for p in plan_list if not p.is_full_precision]
    adaptive = any(threat.shadows == "same-quantizer" for threat in threats)
    per_plan = spec.membership.n_models if adaptive else spec.targets.count
    try:
        cached = PoolStore(cache_dir, spec).is_complete_pool()
        budget = estimate(spec, raw, device, per_plan, len(quantized), len(plan_list) * len(threats), cached, workers,
                          quantize_grid)
    except SpecError as exc:
        raise SpecError(f"{where}: {exc}") from None
    if spec.calibration.source == "heldout":
        n_test = min(spec.dataset.test_size or raw.test, raw.test)
        if spec.calibration.size >= n_test:
            raise SpecError(f"{where}: calibration.size: {spec.calibration.size} held-out images would leave no "
                            f"test split (the test split has {n_test})")
    found = problems(budget, Machine.current(device, cache_dir))
    if found:
        raise SpecError("\n".join(f"{where}: {line}" for line in found))
    return budget


__all__ = ["Budget", "Machine", "check_budget", "estimate", "measure_model", "problems", "scoring_work"]
