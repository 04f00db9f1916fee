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
from collections.abc import Hashable, Sequence

import torch
import torch.nn as nn

from ..pool.train import device_memory
from .calibration import Calibration

# The memo keeps at most this share of the host's memory, and never more than MEMO_BYTES.
MEMO_SHARE = 1 / 8
MEMO_BYTES = 4 << 30

# One unit's result: per model, layer name -> quantized weight.
UnitWeights = list[dict[str, torch.Tensor]]
Run = list[tuple[Hashable, UnitWeights]]


def memo_budget() -> int:
    return int(min(MEMO_BYTES, MEMO_SHARE * device_memory(torch.device("cpu"))))


def content_key(models: Sequence[nn.Module], calibrations: Sequence[Calibration], settings: object) -> str:
    """A digest of everything a quantization reads: the models (architecture and state), the calibration
    data and ``settings``."""
    digest = hashlib.blake2b(digest_size=20)
    for model in models:
        digest.update(repr(model).encode())  # strides, paddings, eps: what the state does not hold
        state = model.state_dict()
        # Buffers registered persistent=False are not in the state, but the forward pass reads them too.
        unsaved = [(name, tensor) for name, tensor in model.named_buffers() if name not in state]
        for name, tensor in [*state.items(), *unsaved]:
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:{tensor.device}".encode())
            digest.update(_bytes_of(tensor))
    for calibration in calibrations:
        digest.update(_bytes_of(calibration.raw))
        digest.update(_bytes_of(calibration.images))  # what normalize makes of them
        digest.update(repr((calibration.crop_padding, calibration.hflip, calibration.seed)).encode())
    digest.update(repr(settings).encode())
    return digest.hexdigest()


def _bytes_of(tensor: torch.Tensor) -> bytes:
    # Through uint8, so that any dtype (bfloat16 too, which numpy lacks) hashes by its bits.
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


class UnitMemo:
    """The runs of units earlier plans quantized, each under its group's ``content_key``, oldest first.

    Beyond the budget the oldest runs go first. ``evaluate`` quantizes plan after plan, each over the
    groups in the same order, and the plan that replays is the next one: what it needs is the last
    plan's runs, which are the newest. (Dropping the least recently used group instead would, in that
    cyclic order, drop each group just before the next plan reaches it.)
    """

    def __init__(self, budget: int | None = None) -> None:
        self.budget = memo_budget() if budget is None else budget
        self.runs: list[tuple[str, Run]] = []

    def replay(self, key: str, steps: Sequence[Hashable]) -> Replay:
        """What a plan whose units are described by ``steps`` (e.g. their levels, in order) can skip."""
        best: Run = []
        for group, run in self.runs:
            if group != key:
                continue
            matched = 0
            while matched < min(len(run), len(steps)) and run[matched][0] == steps[matched]:
                matched += 1
            if matched > len(best):
                best = run[:matched]
        return Replay(self, key, list(best), list(steps))

    def holds(self, run: Run) -> bool:
        return any(kept is run for _, kept in self.runs)

    def _store(self, key: str, run: Run) -> None:
        # A run that the new one extends (it shares the very entries) is dropped: the new one holds it all.
        self.runs = [(group, kept) for group, kept in self.runs
                     if group != key or len(kept) > len(run) or not all(a is b for a, b in zip(kept, run))]
        self.runs.append((key, run))

    def _shrink(self) -> None:
        while self.runs and self._bytes() > self.budget:
            self.runs.pop(0)

    def _bytes(self) -> int:
        seen: dict[int, int] = {}
        for _, run in self.runs:
            for _, weights in run:
                for per_model in weights:
                    for tensor in per_model.values():
                        seen[id(tensor)] = tensor.numel() * tensor.element_size()
        return sum(seen.values())


class Replay:
    """One plan's pass over its units: the known ones to replay, the new ones to remember."""

    def __init__(self, memo: UnitMemo, key: str, run: Run, steps: list[Hashable]) -> None:
        self.memo = memo
        self.key = key
        self.run = run  # the replayed prefix, extended by ``remember``; stored once it holds a new unit
        self.steps = steps
        self.replayed = len(run)
        self.position = len(run)  # the next unit to remember
        self.dropped = False  # over the budget: nothing more of this plan is kept

    def known(self, position: int) -> UnitWeights | None:
        """The weights of the ``position``-th unit if an earlier plan quantized it the same way."""
        return self.run[position][1] if position < self.replayed else None

    def remember(self, position: int, weights: UnitWeights) -> None:
        """Record the ``position``-th unit's new weights (units are remembered in order, none skipped)."""
        if position != self.position:
            raise ValueError(f"unit {position} remembered out of order (expected {self.position})")
        self.position += 1
        if self.dropped:
            return
        self.run.append((self.steps[position], [{name: w.detach().to("cpu", copy=True) for name, w in per_model.items()}
                                                for per_model in weights]))
        if position == self.replayed:
            self.memo._store(self.key, self.run)
        self.memo._shrink()
        # A run the budget pushed out cannot be replayed by a later plan: stop copying its units.
        self.dropped = not self.memo.holds(self.run)
