"""Work a plan shares with an earlier plan of the grid: the leading units it quantizes the same way.

The built-in methods quantize a model's units (layers or blocks) one after another, and what a
unit becomes depends only on the models as they came in, the calibration data, the method's
settings, the unit's own levels and the units quantized before it. So two plans that give the
first k units the same levels quantize those k units to the same bits. The task grid's
``w1.58-last8`` is ``w1.58`` with the classifier at 8 bits: every unit but the last is the same.

A quantizer object keeps, per group of models, the units each plan quantized (``UnitMemo``); a
later plan of the same group replays the longest matching run of units and quantizes only the
rest (``Replay``). The runner quantizes a grid's plans with one quantizer object in one process,
so the plans that follow find what the earlier ones did; a worker process starts empty. The
replayed weights are the ones the skipped work computed, so the result is bit for bit what the
plan alone gives (tests/test_unit_memo.py).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Sequence

import torch
import torch.nn as nn

from .calibration import Calibration

# Kept units beyond this many bytes (in host memory) drop the least recently used group first.
MEMO_BYTES = 1 << 30

# One unit's result: per model, layer name -> quantized weight.
UnitWeights = list[dict[str, torch.Tensor]]


def content_key(models: Sequence[nn.Module], calibrations: Sequence[Calibration], settings: object) -> str:
    """A digest of everything a quantization reads: the models' state, the calibration data and ``settings``."""
    digest = hashlib.blake2b(digest_size=20)
    for model in models:
        for name, tensor in model.state_dict().items():
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:{tensor.device}".encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for calibration in calibrations:
        digest.update(calibration.raw.cpu().contiguous().numpy().tobytes())
        digest.update(calibration.images.cpu().contiguous().numpy().tobytes())  # what normalize makes of them
        digest.update(repr((calibration.crop_padding, calibration.hflip, calibration.seed)).encode())
    digest.update(repr(settings).encode())
    return digest.hexdigest()


class UnitMemo:
    """Per group (a ``content_key``): the runs of units earlier plans quantized, each as (step, weights)."""

    def __init__(self, budget: int = MEMO_BYTES) -> None:
        self.budget = budget
        self.groups: OrderedDict[str, list[list[tuple[Hashable, UnitWeights]]]] = OrderedDict()

    def replay(self, key: str, steps: Sequence[Hashable]) -> Replay:
        """What a plan whose units are described by ``steps`` (e.g. their levels, in order) can skip."""
        runs = self.groups.get(key, [])
        if runs:
            self.groups.move_to_end(key)
        best: list[tuple[Hashable, UnitWeights]] = []
        for run in runs:
            matched = 0
            while matched < min(len(run), len(steps)) and run[matched][0] == steps[matched]:
                matched += 1
            if matched > len(best):
                best = run[:matched]
        return Replay(self, key, list(best), list(steps))

    def _store(self, key: str, run: list[tuple[Hashable, UnitWeights]]) -> None:
        # A run that the new one extends (it shares the very entries) is dropped: the new one holds it all.
        runs = [r for r in self.groups.get(key, [])
                if len(r) > len(run) or not all(a is b for a, b in zip(r, run))]
        self.groups[key] = runs + [run]
        self.groups.move_to_end(key)

    def _shrink(self) -> None:
        while self.groups and self._bytes() > self.budget:
            self.groups.popitem(last=False)

    def _bytes(self) -> int:
        seen: dict[int, int] = {}
        for runs in self.groups.values():
            for run in runs:
                for _, weights in run:
                    for per_model in weights:
                        for tensor in per_model.values():
                            seen[id(tensor)] = tensor.numel() * tensor.element_size()
        return sum(seen.values())


class Replay:
    """One plan's pass over its units: the known ones to replay, the new ones to remember."""

    def __init__(self, memo: UnitMemo, key: str, run: list[tuple[Hashable, UnitWeights]],
                 steps: list[Hashable]) -> None:
        self.memo = memo
        self.key = key
        self.run = run  # the replayed prefix, extended by ``remember``; stored once it holds a new unit
        self.steps = steps
        self.replayed = len(run)

    def known(self, position: int) -> UnitWeights | None:
        """The weights of the ``position``-th unit if an earlier plan quantized it the same way."""
        return self.run[position][1] if position < self.replayed else None

    def remember(self, position: int, weights: UnitWeights) -> None:
        """Record the ``position``-th unit's new weights (units are remembered in order, none skipped)."""
        if position != len(self.run):
            raise ValueError(f"unit {position} remembered out of order (expected {len(self.run)})")
        self.run.append((self.steps[position], [{name: w.detach().to("cpu", copy=True) for name, w in per_model.items()}
                                                for per_model in weights]))
        if position == self.replayed:
            self.memo._store(self.key, self.run)
        self.memo._shrink()
