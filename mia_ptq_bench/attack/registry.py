"""The attack registry: each attack maps one target's scores and its shadows' to membership scores.

An attack is ``attack(inputs, spec) -> (N,) scores`` (higher = more likely a member), where
``inputs`` holds the arrays of one target and ``spec`` the task, whose ``lira`` and ``rmia``
sections carry the attacks' options. Registering a new attack is one decorated function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..registry import Registry
from ..spec.schema import TaskSpec
from .lira import global_threshold, lira_offline, lira_online
from .rmia import rmia_offline, rmia_online


@dataclass(frozen=True)
class AttackInput:
    """One target's attack: shadow (reference) model scores and membership, the target's scores, the population."""

    shadow_scores: np.ndarray  # (S, N, Q) logit-scaled confidences of the shadows
    shadow_in: np.ndarray  # (S, N) bool: shadow s trained on example n
    target_scores: np.ndarray  # (N, Q)
    population: np.ndarray  # (N,) bool: examples the attacker may use as population data (not in the target)
    # What several attacks derive from these same arrays (LiRA's fits, RMIA's reference means), computed
    # by the first that needs it; the arrays must not change after the first attack ran.
    memo: dict = field(default_factory=dict, compare=False, repr=False)


Attack = Callable[[AttackInput, TaskSpec], np.ndarray]
ATTACKS: Registry[Attack] = Registry("attack")


@ATTACKS.register("lira-online")
def _lira_online(x: AttackInput, spec: TaskSpec) -> np.ndarray:
    return lira_online(x.shadow_scores, x.shadow_in, x.target_scores, equalize_counts=spec.lira.equalize_counts,
                       memo=x.memo)


@ATTACKS.register("lira-online-fixed")
def _lira_online_fixed(x: AttackInput, spec: TaskSpec) -> np.ndarray:
    return lira_online(x.shadow_scores, x.shadow_in, x.target_scores, fixed_variance=True,
                       fixed_variance_out=spec.lira.fixed_variance_out, equalize_counts=spec.lira.equalize_counts,
                       memo=x.memo)


@ATTACKS.register("lira-offline")
def _lira_offline(x: AttackInput, spec: TaskSpec) -> np.ndarray:
    return lira_offline(x.shadow_scores, x.shadow_in, x.target_scores, test=spec.lira.offline_test,
                        equalize_counts=spec.lira.equalize_counts, memo=x.memo)


@ATTACKS.register("lira-offline-fixed")
def _lira_offline_fixed(x: AttackInput, spec: TaskSpec) -> np.ndarray:
    return lira_offline(x.shadow_scores, x.shadow_in, x.target_scores, fixed_variance=True,
                        test=spec.lira.offline_test, equalize_counts=spec.lira.equalize_counts, memo=x.memo)


@ATTACKS.register("rmia-offline")
def _rmia_offline(x: AttackInput, spec: TaskSpec) -> np.ndarray:
    options = spec.rmia_options
    return rmia_offline(x.shadow_scores, x.shadow_in, x.target_scores, x.population, a=options.offline_a,
                        gamma=options.gamma, memo=x.memo)


@ATTACKS.register("rmia-online")
def _rmia_online(x: AttackInput, spec: TaskSpec) -> np.ndarray:
    return rmia_online(x.shadow_scores, x.shadow_in, x.target_scores, x.population, gamma=spec.rmia_options.gamma,
                       memo=x.memo)


@ATTACKS.register("global-threshold")
def _threshold(x: AttackInput, spec: TaskSpec) -> np.ndarray:
    return global_threshold(x.target_scores)
