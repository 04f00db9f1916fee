from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from mia_ptq_bench.pool import balanced_keep_masks
from mia_ptq_bench.inference import logit_scaled_confidence


@pytest.mark.parametrize("n_models, n_examples, pkeep", [(64, 1000, 0.5), (16, 333, 0.5), (10, 2000, 0.3)])
def test_masks_are_balanced(n_models: int, n_examples: int, pkeep: float) -> None:
    keep = balanced_keep_masks(n_models, n_examples, pkeep, seed=0)
    assert keep.shape == (n_models, n_examples) and keep.dtype == bool
    assert (keep.sum(axis=0) == int(pkeep * n_models)).all()
    # each model trains on roughly pkeep of the pool
    assert np.abs(keep.mean(axis=1) - pkeep).max() < 0.15


def test_masks_match_reference_formulation() -> None:
    np.random.seed(3)  # the reference code seeds the global legacy generator
    reference = np.random.uniform(0, 1, size=(16, 200)).argsort(0) < 8
    assert np.array_equal(balanced_keep_masks(16, 200, 0.5, seed=3), reference)
    assert not np.array_equal(balanced_keep_masks(16, 200, 0.5, seed=4), reference)


def test_score_equals_direct_float64_computation() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(500, 10)).astype(np.float32)
    labels = rng.integers(0, 10, size=500)
    p = softmax(logits.astype(np.float64), axis=1)
    p_true = p[np.arange(500), labels]
    direct = np.log(p_true) - np.log(p.sum(axis=1) - p_true)
    np.testing.assert_allclose(logit_scaled_confidence(logits, labels), direct, rtol=1e-10, atol=1e-10)


def test_score_is_stable_for_extreme_logits() -> None:
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 800.0, 799.0]])
    scores = logit_scaled_confidence(logits, np.array([0, 2]))
    assert np.isfinite(scores).all()
    assert scores[0] == pytest.approx(1000.0 - np.log(1 + np.exp(-1000.0)))
    assert scores[1] == pytest.approx(799.0 - 800.0 - np.log1p(np.exp(-800.0)))


def test_score_keeps_leading_axes() -> None:
    logits = np.zeros((2, 3, 4))
    labels = np.zeros((2, 3), dtype=int)
    np.testing.assert_allclose(logit_scaled_confidence(logits, labels), np.full((2, 3), -np.log(3)))
