"""RMIA against a plain, loop-by-loop implementation written here, plus behaviour that could go wrong.

The plain implementation works in probability space with Python floats and exact
fractions: sigmoid of each score, arithmetic means over the chosen reference models, one
ratio per query, the pairwise test ``r(x) / r(z) > γ`` for every pair. It shares no code
with the vectorised log-space version. Agreement tests first check that no pair sits
within 1e-9 of the threshold and no two ratios within 1e-9 of each other, so no assertion
hinges on the last bits of one machine's rounding.
"""

from __future__ import annotations

import math
from fractions import Fraction

import independent
import numpy as np
import pytest

from mia_ptq_bench.attack.lira import lira_offline, lira_online
from mia_ptq_bench.attack.rmia import (
    pairwise_score,
    population_mask,
    relative_likelihood,
    rmia_offline,
    rmia_online,
    select_references,
)
from mia_ptq_bench.metrics import attack_metrics

# ----------------------------------------------------------------------------- plain implementation


def sigmoid(value: float) -> float:
    if value >= 0:
        return 1.0 / (1.0 + math.exp(-value))
    return math.exp(value) / (1.0 + math.exp(value))


def plain_ratios(shadow, shadow_in, target, references, online, a):
    """r(x) = geometric mean over queries of p_y(x|θ) / Pr(x), one example at a time."""
    models, examples, queries = shadow.shape
    ratios = []
    for n in range(examples):
        product = 1.0
        for q in range(queries):
            ins = [sigmoid(shadow[s, n, q]) for s in range(models) if references[s, n] and shadow_in[s, n]]
            outs = [sigmoid(shadow[s, n, q]) for s in range(models) if references[s, n] and not shadow_in[s, n]]
            mean_out = sum(outs) / len(outs)
            if online:
                prior = (sum(ins) / len(ins) + mean_out) / 2
            else:
                prior = (1 + a) / 2 * mean_out + (1 - a) / 2
            product *= sigmoid(target[n, q]) / prior
        ratios.append(product ** (1.0 / queries))
    return ratios


def plain_scores(ratios, population, gamma, tie_break):
    """Population samples other than x that x γ-dominates, over |Z|; ties broken as documented."""
    examples = len(ratios)
    fractions = []
    for n in range(examples):
        others = [z for z in population if z != n]
        wins = sum(1 for z in others if ratios[n] / ratios[z] > gamma)
        fractions.append(Fraction(wins, len(population)))
    if not tie_break:
        return [float(f) for f in fractions]
    step = Fraction(1, 2 * len(population))
    scores = []
    for n in range(examples):
        group = [m for m in range(examples) if fractions[m] == fractions[n]]
        below = sum(1 for m in group if ratios[m] < ratios[n])
        scores.append(float(fractions[n] + step * Fraction(below, len(group))))
    return scores


def assert_tie_free(ratios, population, gamma):
    """The premise that keeps both implementations' comparisons away from rounding."""
    logs = [math.log(r) for r in ratios]
    for x in range(len(logs)):
        for z in population:
            if z != x:
                assert abs(logs[x] - logs[z] - math.log(gamma)) > 1e-9
        for y in range(x):
            assert abs(logs[x] - logs[y]) > 1e-9


# ----------------------------------------------------------------------------- fixtures


def random_case(seed: int, models: int = 12, examples: int = 40, queries: int = 2):
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(2.0, 2.5, (1, examples, 1))
    shadow = difficulty + rng.normal(0.0, 1.5, (models, examples, queries))
    shadow_in = rng.random((models, examples)) < 0.5
    shadow_in[:2], shadow_in[2:6] = True, False  # at least two IN and four OUT models for every example
    shadow = shadow + 1.5 * shadow_in[..., None]
    target_in = rng.random(examples) < 0.5
    target = difficulty[0] + rng.normal(0.0, 1.5, (examples, queries)) + 1.5 * target_in[:, None]
    return shadow, shadow_in, target, target_in


def population_for(kind: str, target_in: np.ndarray, seed: int):
    if kind == "non-members":  # the benchmark's choice: every non-member is scored and in the population
        return ~target_in
    if kind == "indices":  # an index array of a random subset, unrelated to membership
        return np.sort(np.random.default_rng(seed + 100).choice(target_in.size, target_in.size // 3, replace=False))
    return np.ones(target_in.size, dtype=bool)  # every scored example is in the population


# ----------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("k", [None, 2, 4])
@pytest.mark.parametrize("population_kind", ["non-members", "indices", "all"])
def test_rmia_equals_plain_loop(seed: int, online: bool, k: int | None, population_kind: str) -> None:
    shadow, shadow_in, target, target_in = random_case(seed)
    references = select_references(shadow_in, k, online=online, seed=seed)
    population = population_for(population_kind, target_in, seed)
    members = [int(i) for i in np.flatnonzero(population_mask(population, target.shape[0]))]
    a = 0.3
    ratios = plain_ratios(shadow, shadow_in, target, references, online, a)
    ours_log = relative_likelihood(shadow, shadow_in, target, online=online, references=references, a=a)
    np.testing.assert_allclose(ours_log, [math.log(r) for r in ratios], rtol=0, atol=1e-9)
    attack = rmia_online if online else rmia_offline
    options = {} if online else {"a": a}
    for gamma in (1.0, 2.0, 3.7):
        assert_tie_free(ratios, members, gamma)
        for tie_break in (False, True):
            ours = attack(shadow, shadow_in, target, population, references=references, gamma=gamma,
                          tie_break=tie_break, **options)
            theirs = plain_scores(ratios, members, gamma, tie_break)
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9)


@pytest.mark.parametrize("a", [0.0, 1.0])
def test_offline_a_extremes_equal_plain_loop(a: float) -> None:
    shadow, shadow_in, target, target_in = random_case(3, queries=1)
    references = np.ones_like(shadow_in)
    ratios = plain_ratios(shadow, shadow_in, target, references, False, a)
    np.testing.assert_allclose(relative_likelihood(shadow, shadow_in, target, online=False, a=a),
                               [math.log(r) for r in ratios], rtol=0, atol=1e-9)
    members = [int(i) for i in np.flatnonzero(~target_in)]
    assert_tie_free(ratios, members, 1.0)
    np.testing.assert_allclose(rmia_offline(shadow, shadow_in, target, ~target_in, a=a),
                               plain_scores(ratios, members, 1.0, True), rtol=0, atol=1e-9)


def test_large_population_matches_brute_force_on_a_sample() -> None:
    """N = 60,000 with |Z| = 30,000 in sort + searchsorted; a sample of rows checked by full comparison."""
    rng = np.random.default_rng(5)
    log_ratio = rng.normal(size=60_000)
    population = rng.permutation(60_000)[:30_000]
    scores = pairwise_score(log_ratio, population, gamma=1.5, tie_break=False)
    inside = np.zeros(60_000, dtype=bool)
    inside[population] = True
    for x in rng.choice(60_000, 40, replace=False):
        others = inside.copy()
        others[x] = False
        margin = log_ratio[x] - log_ratio[others] - math.log(1.5)
        assert np.abs(margin).min() > 1e-9
        assert scores[x] == (margin > 0).sum() / 30_000
    broken = pairwise_score(log_ratio, population, gamma=1.5)
    assert np.abs(broken - scores).max() < 1.0 / (2 * 30_000)


# ----------------------------------------------------------------------------- reference selection


@pytest.mark.parametrize("online, k", [(False, 1), (False, 3), (True, 2), (True, 6)])
def test_select_references_gives_every_example_exactly_k(online: bool, k: int) -> None:
    shadow_in = np.random.default_rng(0).random((20, 300)) < 0.5
    shadow_in[:4], shadow_in[4:8] = True, False
    chosen = select_references(shadow_in, k, online=online, seed=7)
    if online:
        assert ((chosen & shadow_in).sum(axis=0) == k // 2).all()
        assert ((chosen & ~shadow_in).sum(axis=0) == k // 2).all()
    else:
        assert (chosen.sum(axis=0) == k).all() and not (chosen & shadow_in).any()
    assert np.array_equal(chosen, select_references(shadow_in, k, online=online, seed=7)), "seeded: same answer"
    assert not np.array_equal(chosen, select_references(shadow_in, k, online=online, seed=8))
    # drawn per example, not the first k models of the pool for everyone
    per_model = chosen.sum(axis=1)
    assert (per_model > 0).sum() > 2 * k


def test_select_references_none_is_everything() -> None:
    shadow_in = np.eye(3, dtype=bool)
    assert select_references(shadow_in, None, online=True).all()


def test_lira_with_references_equals_independent_loop_per_example() -> None:
    shadow, shadow_in, target, _ = random_case(4, models=16, examples=30)
    chosen = select_references(shadow_in, 4, online=True, seed=1)
    ours_online = lira_online(shadow, shadow_in, target, references=chosen)
    offline_chosen = select_references(shadow_in, 3, online=False)
    ours_offline = lira_offline(shadow, shadow_in, target, references=offline_chosen)
    for j in range(shadow.shape[1]):
        rows = chosen[:, j]
        theirs = independent.lira(shadow[rows, j:j + 1], shadow_in[rows, j:j + 1], target[j:j + 1], online=True)
        np.testing.assert_allclose(ours_online[j], theirs[0], rtol=1e-12, atol=1e-12)
        rows = offline_chosen[:, j] | shadow_in[:, j]  # IN rows are ignored offline
        theirs = independent.lira(shadow[rows, j:j + 1], shadow_in[rows, j:j + 1], target[j:j + 1], online=False)
        np.testing.assert_allclose(ours_offline[j], theirs[0], rtol=1e-12, atol=1e-12)


def test_lira_references_equal_to_row_subset_for_fixed_variance() -> None:
    shadow, shadow_in, target, _ = random_case(6, models=16, examples=30)
    rows = np.zeros(16, dtype=bool)
    rows[[0, 2, 5, 7, 9, 12]] = True
    mask = np.repeat(rows[:, None], 30, axis=1)
    for fn in (lira_online, lira_offline):
        np.testing.assert_allclose(fn(shadow, shadow_in, target, fixed_variance=True, references=mask),
                                   fn(shadow[rows], shadow_in[rows], target, fixed_variance=True), rtol=1e-12)


# ----------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("attack", [rmia_offline, rmia_online])
def test_member_far_above_its_references_ranks_above_every_non_member(attack) -> None:
    rng = np.random.default_rng(0)
    shadow = rng.normal(0.0, 1.0, (10, 200, 1)) + rng.normal(0.0, 2.0, (1, 200, 1))
    shadow_in = np.zeros((10, 200), dtype=bool)
    shadow_in[:5] = True
    target = shadow[5:].mean(axis=0) + rng.normal(0.0, 0.3, (200, 1))
    target_in = np.zeros(200, dtype=bool)
    target_in[17] = True
    target[17] = shadow[:, 17].max() + 8.0
    scores = attack(shadow, shadow_in, target, ~target_in)
    assert scores[17] > scores[~target_in].max()
    assert attack(shadow, shadow_in, target, ~target_in, tie_break=False)[17] == 1.0


def test_offline_ignores_in_references_and_online_does_not() -> None:
    shadow, shadow_in, target, target_in = random_case(7)
    moved = np.where(shadow_in[..., None], shadow + 5.0 * np.random.default_rng(1).normal(size=shadow.shape), shadow)
    offline = rmia_offline(shadow, shadow_in, target, ~target_in)
    assert np.array_equal(offline, rmia_offline(moved, shadow_in, target, ~target_in))
    assert not np.allclose(rmia_online(shadow, shadow_in, target, ~target_in),
                           rmia_online(moved, shadow_in, target, ~target_in))


def test_top_ties_are_broken_by_the_ratio() -> None:
    """With γ = e^5 two members and the top non-member all dominate the same four samples.

    At 0.1% FPR no false positive is allowed, so the plain score loses both members to the
    tie; the ratio tie-break keeps them, ordered by their own ratios.
    """
    log_ratio = np.array([0.0, 10.0, 20.0, 30.0, 40.0, 42.0, 41.0, 25.0])
    labels = np.array([False, False, False, False, False, True, True, True])
    gamma = math.exp(5.0)
    plain = pairwise_score(log_ratio, ~labels, gamma=gamma, tie_break=False)
    assert plain[4] == plain[5] == plain[6] == 4 / 5
    broken = pairwise_score(log_ratio, ~labels, gamma=gamma)
    assert broken[5] > broken[6] > broken[4] > broken[3]
    assert np.abs(broken - plain).max() < 1.0 / (2 * 5)
    assert attack_metrics(labels, plain).low_fpr[0].true_positives == 0
    assert attack_metrics(labels, broken).low_fpr[0].true_positives == 2


def test_exactly_equal_ratios_stay_tied_on_either_side_of_the_population() -> None:
    """The score is a function of the ratio alone: membership of the population is not visible."""
    log_ratio = np.array([0.0, 1.0, 2.0, 1.5, 1.5, 3.0, 7.0, 7.0])
    population = np.array([True, True, True, True, False, True, True, False])
    for gamma in (1.0, 2.0, 1e6):
        for tie_break in (False, True):
            scores = pairwise_score(log_ratio, population, gamma=gamma, tie_break=tie_break)
            assert scores[3] == scores[4] and scores[6] == scores[7]
    scores = pairwise_score(log_ratio, population)
    assert scores[2] > scores[3] > scores[1]


@pytest.mark.parametrize("gamma", [1.0, 2.0, 50.0])
def test_tie_broken_order_is_the_order_of_the_ratio(gamma: float) -> None:
    rng = np.random.default_rng(3)
    log_ratio = rng.permutation(np.arange(300, dtype=float)) / 10  # distinct, far apart
    population = rng.random(300) < 0.5
    scores = pairwise_score(log_ratio, population, gamma=gamma)
    assert np.array_equal(np.argsort(scores), np.argsort(log_ratio))


def test_plain_score_with_gamma_one_keeps_the_tpr_of_the_ratio() -> None:
    """Ties only join a non-member with members whose ratio is not larger: same TPR at every FPR limit."""
    rng = np.random.default_rng(4)
    labels = rng.random(4000) < 0.5
    log_ratio = np.round(rng.normal(size=4000) + 0.5 * labels, 6)
    plain = pairwise_score(log_ratio, ~labels, tie_break=False)
    assert len(np.unique(plain)) < len(np.unique(log_ratio)), "premise: the plain score has ties"
    levels = (0.001, 0.01, 0.1, 0.5)
    ours, ratio = attack_metrics(labels, plain, levels), attack_metrics(labels, log_ratio, levels)
    assert [p.true_positives for p in ours.low_fpr] == [p.true_positives for p in ratio.low_fpr]
    assert ours.roc_tpr == ratio.roc_tpr
    assert ours.auc > ratio.auc  # the trapezoid over a tie block


def test_population_member_is_not_compared_with_itself() -> None:
    log_ratio = np.array([0.0, 1.0, 2.0])
    everyone = np.ones(3, dtype=bool)
    assert pairwise_score(log_ratio, everyone, tie_break=False).tolist() == [0.0, 1 / 3, 2 / 3]
    assert pairwise_score(log_ratio, np.array([0, 2]), tie_break=False).tolist() == [0.0, 1 / 2, 1 / 2]


def test_confident_examples_keep_distinct_ratios() -> None:
    """φ = 30..40 gives p_y within 1e-13 of 1: no exact ties, and the first-order value of log r."""
    phi_ref = np.array([[[30.0], [34.0], [38.0]], [[31.0], [35.0], [39.0]]])  # 2 OUT models, 3 examples
    shadow_in = np.zeros((2, 3), dtype=bool)
    target = np.array([[32.0], [36.0], [40.0]])
    ours = relative_likelihood(phi_ref, shadow_in, target, online=False, a=0.3)
    weight = 1.3 / 2
    expected = weight * np.exp(-phi_ref[:, :, 0]).mean(axis=0) - np.exp(-target[:, 0])
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    assert len(set(ours.tolist())) == 3


def test_hopeless_examples_do_not_underflow() -> None:
    """φ = -800: p_y underflows to 0 in float64, its logarithm does not."""
    phi_ref = np.array([[[-800.0]], [[-801.0]], [[-802.0]], [[-803.0]]])
    shadow_in = np.array([[True], [True], [False], [False]])
    target = np.array([[-790.0]])
    ours = relative_likelihood(phi_ref, shadow_in, target, online=True)
    log_in = -800.0 + math.log((1 + math.exp(-1.0)) / 2)
    log_out = -802.0 + math.log((1 + math.exp(-1.0)) / 2)
    log_prior = log_out + math.log((1 + math.exp(log_in - log_out)) / 2)
    np.testing.assert_allclose(ours, [-790.0 - log_prior], rtol=1e-12)


# ----------------------------------------------------------------------------- few reference models


def test_an_example_missing_one_side_uses_its_other_side() -> None:
    """With few reference models an example can have them all IN (or all OUT): it borrows the other side's mean."""
    shadow, shadow_in, target, _ = random_case(0, examples=10)
    shadow_in[:, 3] = True  # no OUT model for example 3
    shadow_in[:, 7] = False  # no IN model for example 7
    p_ref = 1 / (1 + np.exp(-shadow[..., 0].astype(np.float64)))
    p_target = 1 / (1 + np.exp(-target[:, 0].astype(np.float64)))
    offline = relative_likelihood(shadow[..., :1], shadow_in, target[:, :1], online=False, a=0.3)
    assert offline[3] == pytest.approx(math.log(p_target[3] / (0.65 * p_ref[:, 3].mean() + 0.35)), rel=1e-9)
    online = relative_likelihood(shadow[..., :1], shadow_in, target[:, :1], online=True)
    assert online[3] == pytest.approx(math.log(p_target[3] / p_ref[:, 3].mean()), rel=1e-9)
    assert online[7] == pytest.approx(math.log(p_target[7] / p_ref[:, 7].mean()), rel=1e-9)


# ----------------------------------------------------------------------------- errors


def test_errors_for_impossible_inputs() -> None:
    shadow, shadow_in, target, target_in = random_case(0, examples=10)
    population = ~target_in
    nowhere = shadow_in.copy()
    nowhere[:] = True
    with pytest.raises(ValueError, match="no OUT reference"):
        rmia_offline(shadow, nowhere, target, population)
    with pytest.raises(ValueError, match="no OUT reference"):
        rmia_online(shadow, nowhere, target, population)
    rmia_offline(shadow, ~nowhere, target, population)  # offline does not need IN models
    with pytest.raises(ValueError, match="no OUT reference"):
        rmia_offline(shadow, shadow_in, target, population, references=shadow_in)
    with pytest.raises(ValueError, match="empty"):
        rmia_offline(shadow, shadow_in, target, np.zeros(10, dtype=bool))
    with pytest.raises(ValueError, match="empty"):
        rmia_offline(shadow, shadow_in, target, np.array([], dtype=int))
    with pytest.raises(ValueError, match="shape"):
        rmia_offline(shadow, shadow_in, target, np.ones(9, dtype=bool))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        rmia_offline(shadow, shadow_in, target, np.array([0, 10]))
    with pytest.raises(ValueError, match="repeat"):
        rmia_offline(shadow, shadow_in, target, np.array([1, 1, 2]))
    with pytest.raises(ValueError, match="bool mask or an integer"):
        rmia_offline(shadow, shadow_in, target, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="shadow_in"):
        rmia_offline(shadow, shadow_in[:, :9], target, population)
    with pytest.raises(ValueError, match="shadow_in"):
        rmia_offline(shadow, shadow_in.astype(int), target, population)
    with pytest.raises(ValueError, match="target_scores"):
        rmia_online(shadow, shadow_in, target[:, :1], population)
    with pytest.raises(ValueError, match="shadow_scores"):
        rmia_online(shadow[..., 0], shadow_in, target, population)
    with pytest.raises(ValueError, match="references"):
        rmia_online(shadow, shadow_in, target, population, references=shadow_in[:5])
    with pytest.raises(ValueError, match="finite"):
        rmia_online(np.where(shadow_in[..., None], np.nan, shadow), shadow_in, target, population)
    with pytest.raises(ValueError, match="a must lie"):
        rmia_offline(shadow, shadow_in, target, population, a=1.5)
    for gamma in (0.999, 0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="gamma"):
            rmia_offline(shadow, shadow_in, target, population, gamma=gamma)
    with pytest.raises(ValueError, match="even k"):
        select_references(shadow_in, 3, online=True)
    with pytest.raises(ValueError, match="fewer than 11 OUT"):  # two of the twelve models hold every example
        select_references(shadow_in, 11, online=False)
    with pytest.raises(ValueError, match="NaN"):
        pairwise_score(np.array([0.0, np.nan, 1.0]), np.ones(3, dtype=bool))
