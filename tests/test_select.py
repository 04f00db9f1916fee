"""Choosing each target's strongest strategy on shadow models alone."""

from __future__ import annotations

import numpy as np
import pytest

import independent
from mia_ptq_bench.attack import THREAT_MODELS, ShadowSet
from mia_ptq_bench.metrics.select import TARGETS_PER_CHOICE, attack_targets, candidate_threats, choose, choose_all
from mia_ptq_bench.spec import load_task


def pool_of(models: int = 12, examples: int = 2000, seed: int = 0):
    """Balanced membership; IN scores sit 3 above OUT ones (informative), per-example offsets make LiRA shine."""
    rng = np.random.default_rng(seed)
    keep = np.argsort(rng.random((models, examples)), axis=0) < models // 2
    offset = rng.normal(0, 4, (1, examples, 1))
    informative = offset + rng.normal(0, 1, (models, examples, 1)) + 3.0 * keep[..., None]
    noise = rng.normal(0, 1, (models, examples, 1))  # says nothing about membership
    ids = np.arange(models)
    return keep, ShadowSet(informative, ids), ShadowSet(noise, ids)


def test_the_informative_strategy_and_attack_win() -> None:
    spec = load_task("tiny-digits")  # attacks: lira-online, lira-offline-fixed, global-threshold
    keep, informative, noise = pool_of()
    choice = choose(spec, keep, 0, {"oblivious": noise, "adaptive": informative}, informative)
    assert choice.threat_model == "adaptive" and choice.attack.startswith("lira")
    assert choice.estimate > 0.05  # a real attack on the pseudo-targets


def test_the_choice_never_reads_the_target_membership() -> None:
    spec = load_task("tiny-digits")
    keep, informative, noise = pool_of()
    strategies = {"oblivious": noise, "adaptive": informative}
    before = choose(spec, keep, 3, strategies, informative)
    tampered = keep.copy()
    tampered[3] = ~tampered[3]  # the truth about the target, inverted
    assert choose(spec, tampered, 3, strategies, informative) == before
    # ...while the pseudo-targets' membership does matter: scramble it and the estimate collapses
    scrambled = keep.copy()
    scrambled[:3] = np.random.default_rng(1).permutation(scrambled[:3].T).T
    assert choose(spec, scrambled, 3, strategies, informative).estimate < before.estimate


def test_candidates_follow_knowledge() -> None:
    run = [THREAT_MODELS.get(n) for n in ("oblivious", "adaptive")]
    names = lambda threat: [t.name for t in candidate_threats(THREAT_MODELS.get(threat), run)]  # noqa: E731
    assert names("oblivious") == ["oblivious"]
    assert names("adaptive") == ["oblivious", "adaptive"]  # least informed first: ties in the choice go to it
    with_rtn = run + [THREAT_MODELS.get("adaptive-rtn")]
    assert [t.name for t in candidate_threats(THREAT_MODELS.get("adaptive"), with_rtn)] == [
        "oblivious", "adaptive-rtn", "adaptive"]
    assert [t.name for t in candidate_threats(THREAT_MODELS.get("adaptive-rtn"), with_rtn)] == [
        "oblivious", "adaptive-rtn"]


def test_no_stand_in_is_a_clear_error() -> None:
    spec = load_task("tiny-digits")
    keep, informative, _ = pool_of()
    only_target = ShadowSet(informative.scores[:1], np.array([0]))
    with pytest.raises(ValueError, match="no shadow model can stand in"):
        choose(spec, keep, 0, {"oblivious": informative}, only_target)


def test_a_block_of_targets_shares_a_choice_that_reads_none_of_their_memberships() -> None:
    spec = load_task("tiny-digits")
    keep, informative, noise = pool_of(models=16)
    strategies = {"oblivious": noise, "adaptive": informative}
    targets = np.arange(6)  # blocks [0..3] and [4, 5]
    choices = choose_all(spec, keep, targets, strategies, informative)
    assert len(choices) == 6 and TARGETS_PER_CHOICE == 4
    assert choices[0] == choices[3] == choose(spec, keep, [0, 1, 2, 3], strategies, informative)
    assert choices[4] == choices[5] == choose(spec, keep, [4, 5], strategies, informative)
    tampered = keep.copy()
    tampered[:4] = ~tampered[:4]  # every target of the first block, inverted
    assert choose_all(spec, tampered, targets, strategies, informative)[:4] == choices[:4]
    # the block's targets stand in for nothing: scrambling models 4.. (the first stand-ins) moves the estimate
    scrambled = keep.copy()
    scrambled[4:8] = np.random.default_rng(1).permutation(scrambled[4:8].T).T
    assert choose(spec, scrambled, [0, 1, 2, 3], strategies, informative).estimate < choices[0].estimate


def test_remembered_choices_are_the_same_and_made_once_per_content(monkeypatch: pytest.MonkeyPatch) -> None:
    # validate shares a memo between results: two evaluations with other target scores but the same shadows make
    # each block's choice once; a change to what a choice reads (a shadow's scores, the masks) makes it afresh.
    from mia_ptq_bench.metrics import select as select_module

    spec = load_task("tiny-digits")
    keep, informative, noise = pool_of()
    oblivious, adaptive = THREAT_MODELS.get("oblivious"), THREAT_MODELS.get("adaptive")
    shadows = {"full-precision": noise, "same-quantizer": informative}
    targets = np.arange(8)
    real, made = select_module.choose, []

    def counted(*args):
        made.append(args[2])
        return real(*args)

    monkeypatch.setattr(select_module, "choose", counted)
    plain = attack_targets(spec, keep, targets, informative.scores[targets], adaptive, [oblivious, adaptive], shadows)
    blocks = len(made)
    assert blocks == -(-len(targets) // TARGETS_PER_CHOICE)
    memo: dict = {}
    first = attack_targets(spec, keep, targets, informative.scores[targets], adaptive, [oblivious, adaptive], shadows,
                           choices=memo)
    other_targets = noise.scores[targets] + 1.0  # another evaluation's targets, the same shadows
    second = attack_targets(spec, keep, targets, other_targets, adaptive, [oblivious, adaptive], shadows, choices=memo)
    assert first.choices == plain.choices == second.choices and len(made) == 2 * blocks
    moved = ShadowSet(informative.scores.copy(), informative.models)
    moved.scores[5, 0, 0] += 1.0
    attack_targets(spec, keep, targets, other_targets, adaptive, [oblivious, adaptive],
                   {"full-precision": noise, "same-quantizer": moved}, choices=memo)
    assert len(made) == 3 * blocks
    flipped = keep.copy()
    flipped[:, 0] = ~flipped[:, 0]
    attack_targets(spec, flipped, targets, other_targets, adaptive, [oblivious, adaptive], shadows, choices=memo)
    assert len(made) == 4 * blocks


def test_given_blocks_are_kept_so_a_left_out_target_reshuffles_no_other_block() -> None:
    # The jackknife (results/jackknife.py) leaves targets out: the others keep the blocks, hence the
    # stand-ins, they had, as they would with the pool drawn again.
    spec = load_task("tiny-digits")
    keep, informative, noise = pool_of(models=16)
    strategies = {"oblivious": noise, "adaptive": informative}
    rest = np.array([1, 2, 3, 4, 5, 6, 7])  # target 0 of [0..3] [4..7] left out
    kept = choose_all(spec, keep, rest, strategies, informative, blocks=[[1, 2, 3], [4, 5, 6, 7], []])
    assert kept[:3] == [choose(spec, keep, [1, 2, 3], strategies, informative)] * 3
    assert kept[3:] == [choose(spec, keep, [4, 5, 6, 7], strategies, informative)] * 4
    reshuffled = choose_all(spec, keep, rest, strategies, informative)  # [1..4] [5..7] without the blocks
    assert reshuffled[3] == choose(spec, keep, [1, 2, 3, 4], strategies, informative)
    with pytest.raises(ValueError, match="in order"):
        choose_all(spec, keep, rest, strategies, informative, blocks=[[2, 1, 3], [4, 5, 6, 7]])


def test_an_exact_tie_goes_to_the_less_informed_strategy() -> None:
    """Every strategy scores the same when the only attack reads no shadow: the choice is the tie-break alone."""
    spec = load_task("tiny-digits")
    spec = spec.model_copy(update={"strongest": spec.strongest.model_copy(update={"attacks": ["global-threshold"]})})
    keep, informative, noise = pool_of()
    threat = THREAT_MODELS.get("adaptive")
    candidates = candidate_threats(threat, [THREAT_MODELS.get(n) for n in ("oblivious", "adaptive")])
    targets = np.array([0, 1])
    target_scores = informative.scores[targets]
    # distinct shadows (not merged as one strategy), yet the attack's scores, hence every key, are equal
    attacked = attack_targets(spec, keep, targets, target_scores, threat, candidates,
                              {"full-precision": noise, "same-quantizer": informative})
    assert [(c.threat_model, c.attack) for c in attacked.choices] == [("oblivious", "global-threshold")] * 2
    # choose() itself keeps the first of equal keys: the caller lists the strategies least informed first
    twin = ShadowSet(informative.scores.copy(), informative.models.copy())
    assert choose(spec, keep, 0, {"oblivious": noise, "adaptive": twin}, informative).threat_model == "oblivious"


MEMBERS, NON_MEMBERS = 200, 1000  # TPR@0.1%FPR allows no false positive, TPR@1%FPR up to 9
LABELS = np.r_[np.ones(MEMBERS, bool), np.zeros(NON_MEMBERS, bool)]  # the stand-in's membership, per example


def ranked(runs: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Distinct integer scores of the examples of ``LABELS`` ranking them in runs of (members, non-members),
    the highest scores first; within a side the examples keep their order."""
    scores = np.empty(len(LABELS))
    member, non_member, score = 0, MEMBERS, float(len(LABELS))
    for m, n in runs:
        for _ in range(m):
            scores[member], member, score = score, member + 1, score - 1
        for _ in range(n):
            scores[non_member], non_member, score = score, non_member + 1, score - 1
    assert (member, non_member) == (MEMBERS, len(LABELS))
    return scores


BETTER_AT_1 = ((20, 5), (30, 995), (150, 0))  # TPR 20/200 at 0.1%, 50/200 at 1%; AUC (20 + 30*.995)/200
HIGHER_AUC = ((20, 5), (10, 20), (170, 975))  # TPR 20/200, 30/200; AUC (20 + 10*.995 + 170*.975)/200
SAME_TPRS_HIGHER_AUC = ((20, 5), (30, 20), (150, 975))  # TPR 20/200, 50/200; AUC (20 + 30*.995 + 150*.975)/200


def test_the_hand_built_rankings_read_as_intended() -> None:
    def read(runs):
        scores = ranked(runs)
        return (independent.tpr_at(LABELS, scores, 0.001), independent.tpr_at(LABELS, scores, 0.01),
                independent.auc(LABELS, scores))

    assert read(BETTER_AT_1) == pytest.approx((0.1, 0.25, (20 + 30 * 0.995) / 200), abs=1e-12)
    assert read(HIGHER_AUC) == pytest.approx((0.1, 0.15, (20 + 10 * 0.995 + 170 * 0.975) / 200), abs=1e-12)
    assert read(SAME_TPRS_HIGHER_AUC) == pytest.approx((0.1, 0.25, (20 + 30 * 0.995 + 150 * 0.975) / 200), abs=1e-12)


@pytest.mark.parametrize("winner_first", [False, True], ids=["winner-more-informed", "winner-less-informed"])
@pytest.mark.parametrize("winner, loser", [(BETTER_AT_1, HIGHER_AUC), (SAME_TPRS_HIGHER_AUC, BETTER_AT_1)],
                         ids=["tpr-at-1%-before-auc", "then-auc"])
def test_equal_tpr_at_0_1_percent_goes_to_tpr_at_1_percent_then_auc(monkeypatch: pytest.MonkeyPatch, winner, loser,
                                                                    winner_first: bool) -> None:
    from mia_ptq_bench.metrics import select

    spec = load_task("tiny-digits")
    spec = spec.model_copy(update={"strongest": spec.strongest.model_copy(update={"attacks": ["probe"]})})
    # The probe attack returns the shadows' mean score per example; each strategy's shadows all hold its ranking.
    monkeypatch.setattr(select, "ATTACKS", {"probe": lambda x, spec: x.shadow_scores[:, :, 0].mean(axis=0)})
    n = len(LABELS)
    assert n <= spec.strongest.examples  # every example is attacked, in order
    keep = np.zeros((4, n), bool)
    keep[1] = LABELS  # pool model 1: the only stand-in (0 is the target)
    keep[2:, : n // 2] = True  # the shadows, 2 and 3: their membership is not read by the probe
    pseudo = ShadowSet(np.zeros((2, n, 1)), np.array([0, 1]))

    def strategy(runs):
        return ShadowSet(np.broadcast_to(ranked(runs)[None, :, None], (2, n, 1)).copy(), np.array([2, 3]))

    order = [("oblivious", winner if winner_first else loser), ("adaptive", loser if winner_first else winner)]
    choice = choose(spec, keep, 0, {name: strategy(runs) for name, runs in order}, pseudo)
    assert choice.threat_model == ("oblivious" if winner_first else "adaptive")
    assert choice.estimate == 0.1  # 20 of 200 members before the first non-member, for both
