"""The LiRA score of one prediction: logit-scaled confidence of the true class."""

from __future__ import annotations

import numpy as np


def logit_scaled_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``log p_y - log sum_{j != y} p_j`` in float64, computed as ``z_y - logsumexp_{j != y} z_j``.

    logits: (..., C); labels: (...) integer class indices. The softmax normaliser
    cancels, so the score needs no probabilities and does not saturate for
    confident predictions.
    """
    z = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    true = np.take_along_axis(z, labels[..., None], axis=-1)[..., 0]
    others = z.copy()
    np.put_along_axis(others, labels[..., None], -np.inf, axis=-1)
    peak = others.max(axis=-1)
    rest = peak + np.log(np.exp(others - peak[..., None]).sum(axis=-1))
    return true - rest
