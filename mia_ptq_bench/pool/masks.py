"""Balanced membership masks, bit for bit as LiRA's reference code draws them."""

from __future__ import annotations

import numpy as np


def balanced_keep_masks(n_models: int, n_examples: int, pkeep: float, seed: int) -> np.ndarray:
    """(n_models, n_examples) bool; every example is IN exactly ``int(pkeep * n_models)`` models.

    Draw U(0,1) with a seeded legacy RandomState, argsort along the models axis,
    keep where the sorted model index is below ``pkeep * n_models``. (The
    reference code compares the argsort itself, not the ranks; both are balanced
    and we keep its exact bits so masks match for the same seed.)
    """
    uniform = np.random.RandomState(seed).uniform(0, 1, size=(n_models, n_examples))
    order = uniform.argsort(0)
    return order < int(pkeep * n_models)
