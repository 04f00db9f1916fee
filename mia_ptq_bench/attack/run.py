"""Running the task's attacks on one set of shadows against each target, leave-one-out."""

from __future__ import annotations

import numpy as np

from ..spec.schema import TaskSpec
from .registry import ATTACKS


def leave_one_out(n_models: int, target: int) -> np.ndarray:
    """Shadow indices for a pool target: every other pool model (LiRA's own evaluation)."""
    return np.delete(np.arange(n_models), target)


def run_attacks(spec: TaskSpec, keep: np.ndarray, shadow_scores: np.ndarray, targets: np.ndarray,
                target_scores: np.ndarray) -> dict[str, np.ndarray]:
    """Membership scores (T, N) per attack of the task; each target's shadows are all other pool models."""
    membership = {}
    for name in spec.attacks:
        attack = ATTACKS.get(name)
        rows = []
        for row, target in enumerate(targets):
            shadows = leave_one_out(keep.shape[0], int(target))
            rows.append(attack(shadow_scores[shadows], keep[shadows], target_scores[row], spec.lira))
        membership[name] = np.stack(rows)
    return membership
