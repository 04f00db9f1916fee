"""Build (or resume) a task's model pool: train every model, score every pool example."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

from ..data import ImageDataset
from ..progress import Progress, SilentProgress
from ..score import accuracy, score_split
from ..spec.schema import TaskSpec
from .masks import balanced_keep_masks
from .store import PoolStore
from .train import Speed, can_stack, init_model, make_schedule, train_sequential, train_stacked

Trainer = Literal["auto", "sequential", "stacked"]
DEFAULT_STACK = 16  # models per stacked group: also the most work an interrupted build can lose


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
        model.load_state_dict(self.store.load_weights(index))
        return model.to(device).eval()


def pool_keep_masks(spec: TaskSpec, n_examples: int) -> np.ndarray:
    m = spec.membership
    return balanced_keep_masks(m.n_models, n_examples, m.pkeep, m.seed)


def build_pool(spec: TaskSpec, dataset: ImageDataset, cache_dir: Path, device: str | torch.device = "cpu",
               progress: Progress | None = None, trainer: Trainer = "auto", stack: int = DEFAULT_STACK,
               speed: Speed | None = None) -> Pool:
    progress = progress or SilentProgress()
    device = torch.device(device)
    speed = speed or Speed.for_device(device)
    n_models, n_examples = spec.membership.n_models, len(dataset.pool)
    keep = pool_keep_masks(spec, n_examples)
    store = PoolStore(cache_dir, spec)
    store.ensure_header(keep)

    done = [store.is_complete(i) for i in range(n_models)]
    for index in range(n_models):
        problem = store.problem(index) if done[index] else None
        if problem:  # a corrupted cache file is never used: it is thrown away and that model retrained
            progress.log(f"rebuilding model {index}: {problem.split(';')[0]}")
            store.discard(index)
            done[index] = False
    resident = dataset.to(device) if device.type == "cuda" and not all(done) else dataset
    progress.start("pool", f"pool: training {n_models} models", n_models)
    progress.advance("pool", sum(done))
    stacked = trainer == "stacked" or (trainer == "auto" and can_stack(init_model(spec, dataset, 0)))
    group_size = stack if stacked else 1
    # Groups are fixed by model index, and a group is trained whole even when an earlier run
    # saved part of it: stacked results depend (in the last float bits) on the group, so this
    # keeps a resumed pool bit-identical to an uninterrupted one.
    for start in range(0, n_models, group_size):
        group = list(range(start, min(start + group_size, n_models)))
        if all(done[i] for i in group):
            continue
        models = [init_model(spec, dataset, i) for i in group]
        schedules = [make_schedule(spec, np.flatnonzero(keep[i]), n_examples, i) for i in group]
        if len(group) > 1:
            trained = train_stacked(spec, resident, models, schedules, device)
        else:
            trained = [train_sequential(spec, resident, models[0], schedules[0], device, speed)]
        for index, model in zip(group, trained):
            if done[index]:
                continue
            scores = score_split(model, resident, resident.pool, list(spec.queries), device)
            store.save_model(index, model, scores, accuracy(model, resident, resident.test, device))
            progress.advance("pool")

    scores = np.stack([store.load_scores(i) for i in range(n_models)])
    test_acc = np.array([store.record(i).test_accuracy for i in range(n_models)])
    return Pool(spec, dataset, store, keep, scores, test_acc)
