"""Running attacks against each target with the other shadow models (leave-one-out)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..spec.schema import TaskSpec
from .registry import ATTACKS, AttackInput


@dataclass(frozen=True)
class ShadowSet:
    """Scores of the attacker's shadow models, (K, N, Q), and which pool models they are, (K,)."""

    scores: np.ndarray
    models: np.ndarray

    def without(self, keep: np.ndarray, excluded: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """(scores, membership) of every shadow but the ``excluded`` pool models."""
        kept = self.dropping(excluded)
        return kept.scores, keep[kept.models]

    def dropping(self, models: Iterable[int]) -> ShadowSet:
        """The same shadows but the pool models ``models``."""
        rows = ~np.isin(self.models, list(models))
        return ShadowSet(self.scores[rows], self.models[rows])

    def scores_of(self, model: int) -> np.ndarray:
        return self.scores[int(np.flatnonzero(self.models == model)[0])]


def leave_one_out(n_models: int, target: int) -> np.ndarray:
    """Shadow indices for a pool target: every other pool model (LiRA's own evaluation)."""
    return np.delete(np.arange(n_models), target)


def attack_inputs(keep: np.ndarray, shadows: ShadowSet, target: int, target_scores: np.ndarray) -> AttackInput:
    """What the attacker of pool model ``target`` holds: its other shadows, the target's scores, and the
    target's non-members as population data (RMIA); never the target's own membership."""
    scores, shadow_in = shadows.without(keep, [target])
    return AttackInput(scores, shadow_in, target_scores, ~keep[target])


def run_attacks(spec: TaskSpec, keep: np.ndarray, shadows: ShadowSet, targets: np.ndarray,
                target_scores: np.ndarray) -> dict[str, np.ndarray]:
    """Membership scores (T, N) per attack of the task."""
    inputs = [attack_inputs(keep, shadows, int(t), target_scores[row]) for row, t in enumerate(targets)]
    return {name: np.stack([ATTACKS.get(name)(x, spec) for x in inputs]) for name in spec.attacks}
