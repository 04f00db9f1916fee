"""Choosing each target's strongest strategy on shadow models alone."""

from __future__ import annotations

import numpy as np
import pytest

from mia_ptq_bench.attack import THREAT_MODELS, ShadowSet
from mia_ptq_bench.metrics.select import candidate_threats, choose
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
    assert names("adaptive") == ["adaptive", "oblivious"] or names("adaptive") == ["oblivious", "adaptive"]
    with_rtn = run + [THREAT_MODELS.get("adaptive-rtn")]
    assert set(t.name for t in candidate_threats(THREAT_MODELS.get("adaptive"), with_rtn)) == {
        "oblivious", "adaptive-rtn", "adaptive"}


def test_no_stand_in_is_a_clear_error() -> None:
    spec = load_task("tiny-digits")
    keep, informative, _ = pool_of()
    only_target = ShadowSet(informative.scores[:1], np.array([0]))
    with pytest.raises(ValueError, match="no shadow model can stand in"):
        choose(spec, keep, 0, {"oblivious": informative}, only_target)
