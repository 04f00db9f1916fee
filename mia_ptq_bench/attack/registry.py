"""The attack registry: each attack maps shadow and target scores to membership scores."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..registry import Registry
from ..spec.schema import LiraSpec
from .lira import global_threshold, lira_offline, lira_online

Attack = Callable[[np.ndarray, np.ndarray, np.ndarray, LiraSpec], np.ndarray]
ATTACKS: Registry[Attack] = Registry("attack")


@ATTACKS.register("lira-online")
def _online(shadow_scores, shadow_in, target_scores, options: LiraSpec) -> np.ndarray:
    return lira_online(shadow_scores, shadow_in, target_scores, equalize_counts=options.equalize_counts)


@ATTACKS.register("lira-online-fixed")
def _online_fixed(shadow_scores, shadow_in, target_scores, options: LiraSpec) -> np.ndarray:
    return lira_online(shadow_scores, shadow_in, target_scores, fixed_variance=True,
                       fixed_variance_out=options.fixed_variance_out, equalize_counts=options.equalize_counts)


@ATTACKS.register("lira-offline")
def _offline(shadow_scores, shadow_in, target_scores, options: LiraSpec) -> np.ndarray:
    return lira_offline(shadow_scores, shadow_in, target_scores, test=options.offline_test,
                        equalize_counts=options.equalize_counts)


@ATTACKS.register("lira-offline-fixed")
def _offline_fixed(shadow_scores, shadow_in, target_scores, options: LiraSpec) -> np.ndarray:
    return lira_offline(shadow_scores, shadow_in, target_scores, fixed_variance=True, test=options.offline_test,
                        equalize_counts=options.equalize_counts)


@ATTACKS.register("global-threshold")
def _threshold(shadow_scores, shadow_in, target_scores, options: LiraSpec) -> np.ndarray:
    return global_threshold(target_scores)
