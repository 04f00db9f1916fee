"""Running the task's attacks on one set of shadows against each target, leave-one-out."""

from __future__ import annotations

import numpy as np

from ..spec.schema import TaskSpec
from .registry import ATTACKS, AttackInput


def leave_one_out(n_models: int, target: int) -> np.ndarray:
    """Shadow indices for a pool target: every other pool model (LiRA's own evaluation)."""
    return np.delete(np.arange(n_models), target)


def attack_inputs(keep: np.ndarray, shadow_scores: np.ndarray, target: int, target_scores: np.ndarray) -> AttackInput:
    """What the attacker of pool model ``target`` holds: every other model as a shadow, the target's
    non-members as population data (RMIA); never the target's own membership."""
    shadows = leave_one_out(keep.shape[0], target)
    return AttackInput(shadow_scores[shadows], keep[shadows], target_scores, ~keep[target])


def run_attacks(spec: TaskSpec, keep: np.ndarray, shadow_scores: np.ndarray, targets: np.ndarray,
                target_scores: np.ndarray) -> dict[str, np.ndarray]:
    """Membership scores (T, N) per attack of the task."""
    inputs = [attack_inputs(keep, shadow_scores, int(t), target_scores[row]) for row, t in enumerate(targets)]
    return {name: np.stack([ATTACKS.get(name)(x, spec) for x in inputs]) for name in spec.attacks}
