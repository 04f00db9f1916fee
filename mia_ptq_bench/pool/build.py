"""Build (or resume) a task's model pool: train every model, score every pool example."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn as nn

from ..allocator import keep_freed_memory
from ..context import RunContext, threads_of_a_worker, worker_threads
from ..data import ImageDataset
from ..errors import CacheError, SpecError
from ..executor import Executor, ProcessExecutor
from ..progress import Progress, SilentProgress
from ..inference import accuracy, score_split
from ..models.structure import check_quantizable
from ..spec.schema import TaskSpec
from .masks import balanced_keep_masks
from .store import AUTOCAST, BFLOAT16_AUTOCAST, FLOAT32, GROUPS, MIXED, PoolStore
from .train import Speed, auto_stack, auto_workers, check_batch_trains, init_model, make_schedule, native_bfloat16, \
    pool_training_work, task_training_flops, train_sequential, train_stacked

Trainer = Literal["auto", "sequential", "stacked"]


@dataclass
class Pool:
    spec: TaskSpec
    dataset: ImageDataset
    store: PoolStore
    keep: np.ndarray  # (M, N) bool
    scores: np.ndarray  # (M, N, Q) float64
    test_accuracy: np.ndarray  # (M,)

    def load_model(self, index: int, device: str | torch.device = "cpu") -> nn.Module:
        model = init_model(self.spec, self.dataset, index)
        try:
            model.load_state_dict(self.store.load_weights(index))
        except RuntimeError as exc:  # other names or shapes: a pulled file matches only its own manifest
            reason = " ".join(str(exc).split())[:300]
            raise CacheError(f"{self.store.weights_path(index)}: the weights do not fit the task's "
                             f"{self.spec.model.arch} ({reason}); delete {self.store.record_path(index)} to retrain "
                             f"model {index}") from None
        return model.to(device).eval()


def membership_masks(spec: TaskSpec, n_examples: int) -> np.ndarray:
    """The task's membership masks for ``n_examples`` pool examples, as drawn (``pool_keep_masks`` checks them)."""
    m = spec.membership
    return balanced_keep_masks(m.n_models, n_examples, m.pkeep, m.seed)


def pool_keep_masks(spec: TaskSpec, n_examples: int, where: str | None = None) -> np.ndarray:
    """Which pool examples each pool model trains on; refuses a pool that leaves some model fewer members
    than one training batch (or none). ``where``: what the errors name (the task's file; its id by default)."""
    m = spec.membership
    keep = membership_masks(spec, n_examples)
    counts = keep.sum(axis=1)
    fewest, batch = int(counts.argmin()), spec.training.batch_size
    if counts[fewest] < batch:
        pool = (f"a pool of {n_examples} examples (dataset.pool_size, or the whole training split), each IN "
                f"{int(m.pkeep * m.n_models)} of the {m.n_models} models,")
        if counts[fewest] == 0:
            raise SpecError(f"{where or spec.id}: dataset.pool_size: {pool} leaves pool model {fewest} with no "
                            "member to train on; use a larger pool")
        # Every batch would hold some of the model's members twice or more (the study's loader never repeats
        # one within a batch; the schedule's stream of permutations does so only where a batch straddles two).
        raise SpecError(f"{where or spec.id}: training.batch_size: {batch} is more than the {int(counts[fewest])} "
                        f"members of pool model {fewest} ({pool} gives each model about {round(n_examples * m.pkeep)}), "
                        "so every step would train on some members twice; use a smaller batch, or a larger "
                        "dataset.pool_size where the training split holds more")
    return keep


def train_group(spec: TaskSpec, dataset: ImageDataset, store: PoolStore, keep: np.ndarray, group: list[int],
                device: torch.device, speed: Speed) -> list[int]:
    """Train ``group`` (stacked when it has several models) and save the models not yet complete.

    ``dataset`` should already be resident on ``device`` (``ImageDataset.to``) on an accelerator.
    """
    models = [init_model(spec, dataset, i) for i in group]
    schedules = [make_schedule(spec, np.flatnonzero(keep[i]), len(dataset.pool), i) for i in group]
    if len(group) > 1:
        trained = train_stacked(spec, dataset, models, schedules, device, speed)
    else:
        trained = [train_sequential(spec, dataset, models[0], schedules[0], device, speed)]
    saved = []
    for index, model in zip(group, trained):
        if not store.is_complete(index):
            scores = score_split(model, dataset, dataset.pool, list(spec.queries), device)
            store.save_model(index, model, scores, accuracy(model, dataset, dataset.test, device), autocast=speed.amp)
            saved.append(index)
    return saved


def train_unit(context: RunContext, speed: Speed, group: tuple[int, ...], handed: bytes | None = None) -> list[int]:
    """A unit of work (possibly in another process): load the data (unless ``handed``: a worker process on this
    machine gets the driver's, pickled), train a group, write into the shared cache."""
    context.enter()
    dataset = pickle.loads(handed) if handed is not None else context.dataset()
    device = torch.device(context.device)
    keep = pool_keep_masks(context.spec, len(dataset.pool))
    store = PoolStore(context.cache_dir, context.spec)
    store.ensure_header(keep, dataset.digest())  # the worker's data is the driver's, or the unit is refused
    return train_group(context.spec, dataset.to(device) if device.type == "cuda" else dataset, store, keep,
                       list(group), device, speed)


def _layout(group_size: int, workers: int | None) -> str:
    return f"groups of {group_size} models" + (f" in {workers} worker processes" if workers and workers > 1 else "")


def _arithmetic(autocast: bool) -> str:
    return "under bfloat16 autocast" if autocast else "in float32"


CACHED_ARITHMETIC = {FLOAT32: _arithmetic(False), BFLOAT16_AUTOCAST: _arithmetic(True),
                     MIXED: "partly in float32, partly under bfloat16 autocast",
                     None: "in an arithmetic its records do not say"}


def autocast_for(arithmetic: str | None, device: str, say: Callable[[str], None]) -> bool | None:
    """Whether to train a missing pool under bfloat16 autocast so as to match a result whose pool trained in
    ``arithmetic`` (its ``pool_arithmetic``); None, the device's default, for a result that does not say or
    whose pool was mixed. Float32 where this device would only emulate bfloat16, which ``say`` tells."""
    if arithmetic == BFLOAT16_AUTOCAST and not native_bfloat16(torch.device(device)):
        say(f"the result's pool was trained under bfloat16 autocast, which {device} lacks natively: if the pool is "
            "not cached, it is trained in float32 (and the rerun held to a retrained pool's tolerance)")
        return False
    return AUTOCAST.get(arithmetic)


def build_pool(spec: TaskSpec, dataset: ImageDataset, cache_dir: Path, device: str | torch.device = "cpu",
               progress: Progress | None = None, trainer: Trainer = "auto", stack: int | None = None,
               speed: Speed | None = None, executor: Executor | None = None, data_root: Path | None = None,
               download: bool = False, extensions: tuple[str, ...] = (), workers: int | None = None) -> Pool:
    """Train what the cache lacks (locally, or as executor jobs that reload the data from ``data_root``).

    ``stack``: models trained as one group; None chooses from the model's size and the machine.
    ``workers``: groups trained at once, in as many worker processes here unless ``executor`` runs them,
    each a group of G / workers models with its share of the threads; None chooses (pool/train.py
    ``auto_workers``). ``speed``: None trains as the device does by default (``Speed.for_device``), or in
    the arithmetic the unfinished build was started in (each of the layout and the arithmetic is kept
    unless its own argument is given). A script that builds a pool in workers needs an ``if __name__ == "__main__":`` guard.
    """
    keep_freed_memory()
    # Before any training: an architecture whose layers the quantizers would handle wrongly, silently.
    first = init_model(spec, dataset, 0)
    check_quantizable(first, dataset.normalize(dataset.pool.images[:2]))
    check_batch_trains(first, spec.training.batch_size, tuple(dataset.input_shape), spec.model.arch)
    progress = progress or SilentProgress()
    device = torch.device(device)
    chosen_speed = speed is not None
    speed = speed or Speed.for_device(device)
    n_models, n_examples = spec.membership.n_models, len(dataset.pool)
    keep = pool_keep_masks(spec, n_examples)
    store = PoolStore(cache_dir, spec)
    store.ensure_header(keep, dataset.digest())

    done = [store.is_complete(i) for i in range(n_models)]
    for index in range(n_models):
        problem = store.problem(index) if done[index] else None
        if problem:  # a corrupted cache file is never used: it is thrown away and that model retrained
            progress.log(f"rebuilding model {index}: {problem.split(';')[0]}")
            store.discard(index)
            done[index] = False
    # stack=None: models per group from the model's size and the machine (pool/train.py auto_stack)
    group_size = 1 if trainer == "sequential" else stack or auto_stack(spec, dataset, device, trainer == "stacked")
    threads = torch.get_num_threads()
    if workers is not None and workers < 1:
        raise SpecError(f"worker processes: {workers}; need at least 1")
    chosen_workers = workers is not None
    if all(done):
        workers = 1
        cached = store.arithmetic() if chosen_speed else None
        if chosen_speed and AUTOCAST.get(cached) != speed.amp:
            progress.log(f"the pool is cached, trained {CACHED_ARITHMETIC[cached]}: it is used as it is, not trained "
                         f"again {_arithmetic(speed.amp)} (a pool is cached by its task alone)")
    elif workers is None:
        # Judged on the whole pool, so that a resumed build chooses the groups an uninterrupted one did; and
        # whatever runs the units (worker processes here, or Ray's), so that each trains the same bits: groups
        # of G / workers, each with its share of the threads.
        workers = auto_workers(device, threads, pool_training_work(spec, n_examples, task_training_flops(spec, dataset)))
    if workers > 1 and stack is None and group_size > 1:
        group_size = -(-group_size // workers)  # as many models in training at once as one group, in smaller groups
    # Groups are fixed by model index, and a group is trained whole even when an earlier run
    # saved part of it: stacked results depend (in the last float bits) on the group, so this
    # keeps a resumed pool bit-identical to an uninterrupted one. A build resumed on another
    # machine (whose memory could choose other groups) keeps the groups it was started with,
    # unless told otherwise.
    # The same holds for the worker processes (each group's threads): a pool started in one process (every
    # pool built before builds recorded workers) resumes in one; and for the arithmetic (bfloat16 autocast or not).
    resuming = any(done) and not all(done)  # a complete pool has no layout left to keep, nor to speak of
    started = store.group_layout(device.type) if resuming else None
    if started is not None and started != (group_size, workers):
        if trainer == "auto" and stack is None and not chosen_workers:
            progress.log(f"resuming in {_layout(*started)}, as this pool was started (this machine would choose "
                         f"{_layout(group_size, workers)}; delete {store.root / GROUPS} to let it)")
            group_size, workers = started
        else:
            progress.log(f"training in {_layout(group_size, workers)}, where this pool was started in "
                         f"{_layout(*started)}: its models will differ in their last bits from an uninterrupted "
                         "build's")
    # The arithmetic from the models themselves, so that it holds on another device, without groups.json, or for
    # a pulled pool with a model to retrain.
    started_autocast = store.started_autocast([i for i in range(n_models) if done[i]]) if resuming else None
    if started_autocast is not None and started_autocast != speed.amp:
        if chosen_speed:
            progress.log(f"training {_arithmetic(speed.amp)}, where this pool was started {_arithmetic(started_autocast)}"
                         ": its models will differ by more than float rounding from an uninterrupted build's (a mixed "
                         "pool)")
        elif started_autocast and not native_bfloat16(device):
            progress.log(f"this pool was started under bfloat16 autocast, which this {device.type} lacks natively: "
                         "its remaining models train in float32 (a mixed pool)")
        else:
            progress.log(f"resuming {_arithmetic(started_autocast)}, as this pool was started (this machine would "
                         f"train {_arithmetic(speed.amp)}; {'--no-amp' if started_autocast else '--amp'} to do so)")
            speed = replace(speed, amp=started_autocast)
    groups = [list(range(s, min(s + group_size, n_models))) for s in range(0, n_models, group_size)]
    groups = [g for g in groups if not all(done[i] for i in g)]
    if groups:
        store.remember_group_layout(group_size, device.type, workers, speed.amp)
    progress.start("pool", f"pool: {n_models} models, {sum(done)} cached, {len(groups)} group(s) to train",
                   len(groups))
    if (executor is None and min(workers, len(groups)) <= 1) or not groups:
        resident = dataset.to(device) if device.type == "cuda" and groups else dataset  # copied once
        # One group left of a build in workers trains here, with a worker's threads: the bits a worker gives.
        with threads_of_a_worker(workers):
            for group in groups:
                train_group(spec, resident, store, keep, group, device, speed)
                progress.advance("pool")
    else:
        handed = None  # Ray's workers, maybe on other machines, load the data from data_root
        if executor is None:
            progress.log(f"training {len(groups)} groups in {min(workers, len(groups))} processes of "
                         f"{worker_threads(workers, threads)} thread(s) each")
            # The data as loaded here, wherever it came from. Pickled by value: handed over as tensors, it would
            # go through torch's shared memory, which a container's small /dev/shm (64 MB in Docker) refuses.
            executor, handed = ProcessExecutor(workers), pickle.dumps(dataset)
        context = RunContext(spec, Path(cache_dir), data_root, download, str(device),
                             threads=worker_threads(workers, threads), extensions=extensions)
        executor.map(partial(train_unit, context, speed, handed=handed), [tuple(g) for g in groups],
                     gpus=1 if device.type == "cuda" else 0, progress=progress, key="pool",
                     describe=lambda group: f"pool models {group[0]}-{group[-1]}")
        missing = [i for i in range(n_models) if not store.is_complete(i)]
        if missing:
            raise CacheError(f"{store.root}: models {missing} are still missing after the executor finished")

    scores = np.stack([store.load_scores(i, (n_examples, len(spec.queries))) for i in range(n_models)])
    test_acc = np.array([store.record(i).test_accuracy for i in range(n_models)])
    return Pool(spec, dataset, store, keep, scores, test_acc)
