from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

import independent
from mia_ptq_bench.attack import ATTACKS, AttackInput, global_threshold, leave_one_out, lira_offline, lira_online
from mia_ptq_bench.metrics import attack_metrics
from mia_ptq_bench.spec import load_task


def synthetic(gap: float, shadows: int = 32, examples: int = 3000, queries: int = 2, seed: int = 0):
    """Scores ~ N(0, 1) when OUT and N(gap, 1) when IN, for shadows and a target."""
    rng = np.random.default_rng(seed)
    keep = rng.random((shadows + 1, examples)) < 0.5
    scores = rng.normal(0.0, 1.0, (shadows + 1, examples, queries)) + gap * keep[..., None]
    return scores[1:], keep[1:], scores[0], keep[0]


@pytest.mark.parametrize("name", ["lira-online", "lira-online-fixed", "lira-offline", "lira-offline-fixed",
                                  "rmia-online", "rmia-offline", "global-threshold"])
def test_attacks_separate_distinct_gaussians(name: str) -> None:
    shadow, shadow_in, target, labels = synthetic(gap=2.0)
    scores = ATTACKS.get(name)(AttackInput(shadow, shadow_in, target, ~labels), load_task("tiny-digits"))
    assert attack_metrics(labels, scores).auc > 0.85


@pytest.mark.parametrize("name", ["lira-online", "lira-offline", "rmia-online", "rmia-offline", "global-threshold"])
def test_attacks_are_at_chance_on_identical_gaussians(name: str) -> None:
    shadow, shadow_in, target, labels = synthetic(gap=0.0, examples=6000)
    scores = ATTACKS.get(name)(AttackInput(shadow, shadow_in, target, ~labels), load_task("tiny-digits"))
    auc = attack_metrics(labels, scores).auc
    assert abs(auc - 0.5) < 0.03


@pytest.mark.parametrize("online, fixed, one_sided", [
    (True, False, True), (True, True, True), (False, False, True), (False, True, True), (False, False, False),
])
def test_vectorised_lira_equals_independent_loop(online: bool, fixed: bool, one_sided: bool) -> None:
    rng = np.random.default_rng(1)
    shadow = rng.normal(0, 1, (15, 200, 2)) + rng.normal(0, 3, (1, 200, 1))
    shadow_in = rng.random((15, 200)) < 0.5
    shadow_in[0], shadow_in[1] = True, False  # every example has both sides
    target = rng.normal(0, 1, (200, 2))
    if online:
        ours = lira_online(shadow, shadow_in, target, fixed_variance=fixed)
    else:
        ours = lira_offline(shadow, shadow_in, target, fixed_variance=fixed,
                            test="one-sided" if one_sided else "two-sided")
    theirs = independent.lira(shadow, shadow_in, target, online=online, fixed=fixed, one_sided=one_sided)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)


def test_offline_one_sided_is_monotone_in_score() -> None:
    shadow, shadow_in, _, _ = synthetic(gap=1.0, examples=1)
    probe = np.linspace(-3, 3, 7)[:, None, None]
    values = [lira_offline(shadow, shadow_in, p)[0] for p in probe]
    assert np.all(np.diff(values) > 0), "higher confidence must mean more likely a member"


def test_fixed_variance_out_in_quirk_uses_the_in_spread_for_both_sides() -> None:
    shadow, shadow_in, target, _ = synthetic(gap=1.0, examples=300)
    shadow_in[:, :5] = True
    shadow_in[0, :5] = False
    global_in = np.std(np.concatenate([shadow[shadow_in[:, j], j] for j in range(300)]))
    global_out = np.std(np.concatenate([shadow[~shadow_in[:, j], j] for j in range(300)]))
    assert abs(global_in - global_out) > 0.01  # the quirk is visible
    expected = []
    for j in range(300):
        mu_in = np.median(shadow[shadow_in[:, j], j], axis=0)
        mu_out = np.median(shadow[~shadow_in[:, j], j], axis=0)
        expected.append((norm.logpdf(target[j], mu_in, global_in) - norm.logpdf(target[j], mu_out, global_in)).mean())
    quirk = lira_online(shadow, shadow_in, target, fixed_variance=True, fixed_variance_out="in")
    np.testing.assert_allclose(quirk, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lira_online(shadow, shadow_in, target, fixed_variance=True),
                               independent.lira(shadow, shadow_in, target, fixed=True), rtol=1e-10, atol=1e-12)


def test_equalize_counts_keeps_the_first_shadows_up_to_the_smallest_count_of_each_side() -> None:
    """The reference code's truncation: per example, only the first k_in IN and first k_out OUT shadows
    (in shadow order) count, k being the smallest count of that side over all examples (here 5 IN, 6 OUT)."""
    rng = np.random.default_rng(3)
    shadows, examples = 16, 40
    shadow = rng.normal(0, 1, (shadows, examples, 2)) + rng.normal(0, 3, (1, examples, 1))
    target = rng.normal(0, 1, (examples, 2))
    counts = rng.integers(7, 10, examples)  # IN counts 7-9, OUT counts 7-9...
    counts[0], counts[1] = 5, 10  # ...but example 0 has 5 IN and example 1 has 6 OUT: the smallest
    shadow_in = np.zeros((shadows, examples), bool)
    for j in range(examples):
        shadow_in[rng.permutation(shadows)[: counts[j]], j] = True
    online, offline = [], []
    for j in range(examples):
        ins = [shadow[i, j] for i in range(shadows) if shadow_in[i, j]][:5]
        outs = [shadow[i, j] for i in range(shadows) if not shadow_in[i, j]][:6]
        mu_in, sd_in = np.median(ins, axis=0), np.std(ins, axis=0)
        mu_out, sd_out = np.median(outs, axis=0), np.std(outs, axis=0)
        online.append((norm.logpdf(target[j], mu_in, sd_in) - norm.logpdf(target[j], mu_out, sd_out)).mean())
        offline.append(norm.logcdf(target[j], mu_out, sd_out).mean())
    np.testing.assert_allclose(lira_online(shadow, shadow_in, target, equalize_counts=True), online, rtol=1e-10)
    np.testing.assert_allclose(lira_offline(shadow, shadow_in, target, equalize_counts=True), offline, rtol=1e-10)
    assert np.abs(lira_online(shadow, shadow_in, target) - online).max() > 0.01  # the truncation shows


def test_equalize_counts_lets_an_example_without_shadows_on_a_side_borrow() -> None:
    """An example with no OUT shadow made the smallest OUT count 0 and emptied the side for every example
    (an error); it counts only among examples that have some, and that example borrows its fit."""
    shadow, shadow_in, target, _ = synthetic(gap=1.0, examples=10)
    counts = shadow_in.sum(axis=0)
    shadow_in[:, 7] = True  # example 7: every shadow trained on it, no OUT shadow
    truncated = shadow_in.copy()
    k_in, k_out = int(shadow_in.sum(axis=0).min()), int((~shadow_in[:, [j for j in range(10) if j != 7]]).sum(axis=0).min())
    assert k_out > 0 and counts.min() > 0
    # the same as equalizing by hand: first k_in IN and first k_out OUT shadows per example, then the attack
    keep_in = np.cumsum(shadow_in, axis=0) <= k_in
    keep_out = np.cumsum(~shadow_in, axis=0) <= k_out
    served = (shadow_in & keep_in) | (~shadow_in & keep_out)
    expected = lira_online(shadow, truncated, target, references=served)
    np.testing.assert_allclose(lira_online(shadow, shadow_in, target, equalize_counts=True), expected, rtol=1e-12)
    assert np.isfinite(lira_offline(shadow, shadow_in, target, equalize_counts=True)).all()


def test_an_example_with_shadows_on_one_side_only_borrows_the_mean_gap() -> None:
    """Few shadows (a cheap adaptive attacker) leave some examples with no IN or no OUT model."""
    shadow, shadow_in, target, _ = synthetic(gap=1.0, examples=10)
    shadow_in[:, 3] = True  # example 3: every shadow trained on it
    shadow_in[:, 7] = False  # example 7: none did
    both = [j for j in range(10) if j not in (3, 7)]
    med_in = np.array([np.median(shadow[shadow_in[:, j], j], axis=0) for j in range(10) if j in both])
    med_out = np.array([np.median(shadow[~shadow_in[:, j], j], axis=0) for j in range(10) if j in both])
    gap = (med_in - med_out).mean(axis=0)  # (Q,)
    sd_in = np.array([np.std(shadow[shadow_in[:, j], j], axis=0) for j in both + [3]]).mean(axis=0)
    sd_out = np.array([np.std(shadow[~shadow_in[:, j], j], axis=0) for j in both + [7]]).mean(axis=0)
    mu_in_3 = np.median(shadow[:, 3], axis=0)
    mu_out_7 = np.median(shadow[:, 7], axis=0)
    sd_in_3, sd_out_7 = np.std(shadow[:, 3], axis=0), np.std(shadow[:, 7], axis=0)
    expected_3 = (norm.logpdf(target[3], mu_in_3, sd_in_3) - norm.logpdf(target[3], mu_in_3 - gap, sd_out)).mean()
    expected_7 = (norm.logpdf(target[7], mu_out_7 + gap, sd_in) - norm.logpdf(target[7], mu_out_7, sd_out_7)).mean()
    ours = lira_online(shadow, shadow_in, target)
    np.testing.assert_allclose(ours[[3, 7]], [expected_3, expected_7], rtol=1e-10)
    np.testing.assert_allclose(ours[both], independent.lira(shadow[:, both], shadow_in[:, both], target[both]),
                               rtol=0, atol=1e-9)  # the others are untouched
    # offline: example 3 has no OUT shadow; its OUT centre is its IN centre less the gap, its spread the mean OUT one
    offline = lira_offline(shadow, shadow_in, target)
    np.testing.assert_allclose(offline[3], norm.logcdf(target[3], mu_in_3 - gap, sd_out).mean(), rtol=1e-10)
    others = both + [7]  # example 7 (no IN shadow) needs none: the offline attack fits the OUT side alone
    np.testing.assert_allclose(offline[others], independent.lira(shadow[:, others], shadow_in[:, others],
                                                                 target[others], online=False), rtol=1e-10)


def _one_shadow_sides(seed: int = 4):
    """8 shadows, 12 examples: example 4 has a single OUT shadow, example 6 a single IN one, the others 2 or more."""
    shadow, shadow_in, target, _ = synthetic(gap=1.0, shadows=8, examples=12, seed=seed)
    shadow_in[:, 4], shadow_in[:, 6] = True, False
    shadow_in[2, 4], shadow_in[5, 6] = False, True
    counts = shadow_in.sum(axis=0)
    assert counts[4] == 7 and counts[6] == 1 and (np.delete(counts, [4, 6]) >= 2).all()
    assert (np.delete(8 - counts, [4, 6]) >= 2).all()
    return shadow, shadow_in, target


def test_a_side_with_one_shadow_borrows_the_side_mean_spread_instead_of_a_zero_one() -> None:
    """One shadow on a side has a std of 0: the ratio divided by it blew up (|score| ~ 1e57) on exactly that
    example, whatever its membership, and topped the ranking. Its centre is still that shadow's score; its
    spread is the side's mean spread over the examples with two or more shadows there."""
    shadow, shadow_in, target = _one_shadow_sides()
    rest = [j for j in range(12) if j not in (4, 6)]
    sd_in = np.mean([np.std(shadow[shadow_in[:, j], j], axis=0) for j in rest + [4]], axis=0)
    sd_out = np.mean([np.std(shadow[~shadow_in[:, j], j], axis=0) for j in rest + [6]], axis=0)
    mu_in_4, mu_out_4 = np.median(shadow[shadow_in[:, 4], 4], axis=0), shadow[2, 4]
    mu_in_6, mu_out_6 = shadow[5, 6], np.median(shadow[~shadow_in[:, 6], 6], axis=0)
    sd_in_4, sd_out_6 = np.std(shadow[shadow_in[:, 4], 4], axis=0), np.std(shadow[~shadow_in[:, 6], 6], axis=0)
    online = lira_online(shadow, shadow_in, target)
    np.testing.assert_allclose(online[[4, 6]], [
        (norm.logpdf(target[4], mu_in_4, sd_in_4) - norm.logpdf(target[4], mu_out_4, sd_out)).mean(),
        (norm.logpdf(target[6], mu_in_6, sd_in) - norm.logpdf(target[6], mu_out_6, sd_out_6)).mean()], rtol=1e-10)
    np.testing.assert_allclose(online[rest], independent.lira(shadow[:, rest], shadow_in[:, rest], target[rest]),
                               rtol=0, atol=1e-9)
    offline = lira_offline(shadow, shadow_in, target)
    np.testing.assert_allclose(offline[4], norm.logcdf(target[4], mu_out_4, sd_out).mean(), rtol=1e-10)
    np.testing.assert_allclose(offline[rest + [6]], independent.lira(
        shadow[:, rest + [6]], shadow_in[:, rest + [6]], target[rest + [6]], online=False), rtol=1e-10)
    # a fixed variance has no per-example spread to lose: unchanged, the reference loop's numbers
    for online_attack in (True, False):
        attack = lira_online if online_attack else lira_offline
        np.testing.assert_allclose(attack(shadow, shadow_in, target, fixed_variance=True),
                                   independent.lira(shadow, shadow_in, target, online=online_attack, fixed=True),
                                   rtol=1e-10)


def test_equalize_counts_ignores_single_shadow_sides_when_choosing_the_count() -> None:
    """With one example's single OUT shadow setting the count, every example was cut to one OUT shadow: every
    OUT spread 0. The count is the smallest among examples with two or more; the single one borrows."""
    shadow, shadow_in, target = _one_shadow_sides()
    outs = (~shadow_in).sum(axis=0)
    k_out = int(outs[outs >= 2].min())
    k_in = int(shadow_in.sum(axis=0)[shadow_in.sum(axis=0) >= 2].min())
    served = ((shadow_in & (np.cumsum(shadow_in, axis=0) <= k_in))
              | (~shadow_in & (np.cumsum(~shadow_in, axis=0) <= k_out)))
    assert k_out >= 2 and k_in >= 2
    for attack in (lira_online, lira_offline):
        ours = attack(shadow, shadow_in, target, equalize_counts=True)
        np.testing.assert_allclose(ours, attack(shadow, shadow_in, target, references=served), rtol=1e-12)
        assert np.abs(ours).max() < 1e3


def test_no_example_with_two_shadows_on_a_side_is_a_clear_error() -> None:
    shadow, shadow_in, target, _ = synthetic(gap=1.0, shadows=4, examples=6)
    shadow_in[:] = True
    shadow_in[np.arange(6) % 4, np.arange(6)] = False  # one OUT shadow per example
    with pytest.raises(ValueError, match="no example has two shadow models on one side"):
        lira_online(shadow, shadow_in, target)
    assert np.isfinite(lira_online(shadow, shadow_in, target, fixed_variance=True)).all()


def test_no_example_with_both_sides_is_a_clear_error() -> None:
    shadow, shadow_in, target, _ = synthetic(gap=1.0, examples=10)
    shadow_in[:, :5], shadow_in[:, 5:] = True, False
    with pytest.raises(ValueError, match="no example has shadow models on both sides"):
        lira_online(shadow, shadow_in, target)


def test_global_threshold_is_mean_over_queries() -> None:
    np.testing.assert_allclose(global_threshold(np.array([[1.0, 3.0], [0.0, -2.0]])), [2.0, -1.0])


def test_leave_one_out() -> None:
    assert leave_one_out(5, 2).tolist() == [0, 1, 3, 4]


@pytest.mark.parametrize("shadows, equalize", [(32, False), (32, True), (3, False)])
@pytest.mark.parametrize("order", ["registry", "reversed"])
def test_attacks_sharing_one_input_give_what_each_gives_alone(shadows: int, equalize: bool, order: str) -> None:
    # The attacks on one AttackInput share their fits and reference means through its memo; each must
    # still give, bit for bit, what it gives on a fresh input, whichever attack ran first. With 3 shadows
    # some examples have every shadow on one side, so the borrowed fits are shared too.
    scores, shadow_in, target, _ = synthetic(gap=1.0, shadows=shadows, examples=400)
    spec = load_task("digits-mlp")
    spec = spec.model_copy(update={"lira": spec.lira.model_copy(update={"equalize_counts": equalize})})
    population = np.random.default_rng(1).random(target.shape[0]) < 0.5
    names = [name for name, _ in ATTACKS.items()]
    if order == "reversed":
        names = names[::-1]
    shared = AttackInput(scores, shadow_in, target, population)
    for name in names:
        alone = ATTACKS.get(name)(AttackInput(scores, shadow_in, target, population), spec)
        assert np.array_equal(ATTACKS.get(name)(shared, spec), alone, equal_nan=True), name
    assert shared.memo, "the attacks shared nothing"
    assert not any(array.flags.writeable for value in shared.memo.values()
                   for array in (value if isinstance(value, tuple) else (value,)))
