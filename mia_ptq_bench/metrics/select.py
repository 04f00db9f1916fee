"""The strongest attack, chosen the way an attacker could: on models it trained itself.

For each target the attacker tries every strategy it can afford (an attack of the task's
``strongest.attacks`` with shadows of a threat model it knows enough for) against
*pseudo-targets*: some of its own shadow models, standing in for the target, whose
membership it knows because it trained them. Each pseudo-target is attacked with the
remaining shadows (the pseudo-target and the real target left out); the strategy with the
highest TPR at 0.1% FPR over all pseudo-targets' examples together (one ROC: a single model's
few hundred non-members allow no false positive at 0.1%) wins; ties go to the higher TPR at
1% FPR, then AUC, then the less informed strategy. On large pools the pseudo-targets are
attacked on a fixed subset of examples (``strongest.examples``), which bounds the cost. The target's own membership is never read: only then is the
chosen strategy's membership score of the target scored against the truth.

The targets are taken a few at a time (``TARGETS_PER_CHOICE``): one choice serves a block of
targets, and every target of the block is left out of the stand-ins and of their shadows. So no
target's membership enters its own choice, and the choice costs a quarter of one per target
(it dominated evaluation and validation) for the price of 3 fewer shadows per stand-in attack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..atomic import arrays_sha256
from ..attack import ATTACKS, THREAT_MODELS, AttackInput, ShadowSet, ThreatModel, run_attacks
from ..spec.schema import TARGETS_PER_CHOICE, TaskSpec
from .roc import attack_metrics


class NoStandIn(ValueError):
    """No shadow model is left to stand in for a block of targets."""


@dataclass(frozen=True)
class Choice:
    threat_model: str
    attack: str
    estimate: float  # TPR@0.1%FPR over the pseudo-targets (one ROC over their examples)


def choose(spec: TaskSpec, keep: np.ndarray, targets: int | Sequence[int], strategies: dict[str, ShadowSet],
           pseudo: ShadowSet) -> Choice:
    """The strategy (threat model, attack) with the best shadow-only estimate for attacking ``targets``.

    ``targets``: one target or a block of them, all left out. ``strategies`` maps each threat
    model the attacker may use to its shadows, least informed first (``candidate_threats``'
    order): an exact tie keeps the earlier strategy, and the task's attacks in their order; ``pseudo`` holds the models that stand in for
    the target (of the kind the attacker believes the target is). ``keep[t]`` of a target t is never read.
    """
    attacks = spec.strongest.attacks or spec.attacks
    left_out = [int(targets)] if np.ndim(targets) == 0 else [int(t) for t in targets]
    stand_ins = [int(m) for m in pseudo.models if int(m) not in left_out][: spec.strongest.pseudo_targets]
    if not stand_ins:
        raise NoStandIn("no shadow model can stand in for the target: use more shadows")
    examples = evaluation_examples(keep.shape[1], spec.strongest.examples)
    best: tuple[tuple[float, float, float], Choice] | None = None
    labels = np.concatenate([keep[stand_in][examples] for stand_in in stand_ins])
    for threat, shadows in strategies.items():
        inputs = []  # one per stand-in, shared by every attack
        for stand_in in stand_ins:
            shadow_scores, shadow_in = shadows.without(keep, [stand_in, *left_out])
            inputs.append(AttackInput(shadow_scores[:, examples], shadow_in[:, examples],
                                      pseudo.scores_of(stand_in)[examples], ~keep[stand_in][examples]))
        for attack in attacks:
            scores = [ATTACKS.get(attack)(x, spec) for x in inputs]
            # One ROC over every stand-in's examples: with a few hundred non-members each, 0.1% FPR of a single
            # model allows no false positive at all and ranks attacks by chance.
            metrics = attack_metrics(labels, np.concatenate(scores))
            key = (metrics.low_fpr[0].tpr, metrics.low_fpr[1].tpr, metrics.auc)
            if best is None or key > best[0]:
                best = (key, Choice(threat, attack, key[0]))
    assert best is not None
    return best[1]


def evaluation_examples(n: int, size: int) -> np.ndarray:
    """The pool examples the stand-ins are attacked on: all, or a fixed seeded subset of ``size`` (cost grows with N)."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.RandomState(0).choice(n, size, replace=False))


def target_blocks(targets: Sequence[int]) -> list[list[int]]:
    """The targets in blocks of ``TARGETS_PER_CHOICE`` consecutive ones: one choice serves each block."""
    return [[int(t) for t in targets[start:start + TARGETS_PER_CHOICE]] for start in range(0, len(targets), TARGETS_PER_CHOICE)]


def choose_all(spec: TaskSpec, keep: np.ndarray, targets: np.ndarray, strategies: dict[str, ShadowSet],
               pseudo: ShadowSet, blocks: list[list[int]] | None = None, memo: dict | None = None) -> list[Choice]:
    """One choice per block (``target_blocks``' unless given: ``targets`` in order, block by block),
    repeated for each of its targets.

    ``memo``, optional: choices already made, by the content of everything a choice reads. A choice never
    reads the targets' own scores, so results whose attackers hold the same shadows (every oblivious result
    of a task, or every adaptive-rtn one of a plan) share their choices."""
    blocks = target_blocks(targets) if blocks is None else [b for b in blocks if b]
    if [t for b in blocks for t in b] != [int(t) for t in targets]:
        raise ValueError("the blocks must hold the targets, in order")
    inputs = None if memo is None else _choice_inputs(spec, keep, strategies, pseudo)
    made = []
    for block in blocks:
        if memo is None:
            choice = choose(spec, keep, block, strategies, pseudo)
        else:
            key = (inputs, tuple(block))
            if key not in memo:
                memo[key] = choose(spec, keep, block, strategies, pseudo)
            choice = memo[key]
        made += [choice] * len(block)
    return made


def _choice_inputs(spec: TaskSpec, keep: np.ndarray, strategies: dict[str, ShadowSet], pseudo: ShadowSet) -> str:
    """sha256 of what ``choose`` reads besides the block: the task's settings, the masks, the shadows in order."""
    return arrays_sha256(spec.hash, [("keep", keep), *[(f"{n}.{part}", getattr(s, part)) for n, s in strategies.items()
                                                       for part in ("scores", "models")],
                                     ("pseudo.scores", pseudo.scores), ("pseudo.models", pseudo.models)])


def candidate_threats(threat: ThreatModel, threats: list[ThreatModel]) -> list[ThreatModel]:
    """The strategies an attacker of ``threat`` may choose among: the shadows of every threat model of
    ``threats`` (the task's) it knows enough for, and full-precision shadows always (they are the pool)."""
    run = {t.name for t in threats}
    known = [t for _, t in THREAT_MODELS.items()
             if t.knowledge <= threat.knowledge and (t.shadows == "full-precision" or t.name in run)]
    return sorted(known, key=lambda t: t.knowledge)  # ties in the choice go to the less informed strategy


@dataclass
class Attacked:
    """One evaluation's attacks: membership per attack, the strategy chosen per target and its scores."""

    membership: dict[str, np.ndarray]
    choices: list[Choice]
    chosen: np.ndarray  # (T, N)


def attack_targets(spec: TaskSpec, keep: np.ndarray, targets: np.ndarray, target_scores: np.ndarray,
                   threat: ThreatModel, candidates: list[ThreatModel], shadows: dict[str, ShadowSet],
                   blocks: list[list[int]] | None = None, choices: dict | None = None) -> Attacked:
    """The task's attacks with ``threat``'s shadows, and per target the strongest strategy among ``candidates``
    chosen on shadow models alone (``metrics/select.py``), one choice per block of targets (``choose_all``;
    ``choices``: its memo)."""
    distinct: dict[str, ShadowSet] = {}  # at full precision every threat model's shadows are the pool: try them once
    for t in candidates:
        if not any(_same(other, shadows[t.shadows]) for other in distinct.values()):
            distinct[t.name] = shadows[t.shadows]
    computed = {name: run_attacks(spec, keep, s, targets, target_scores) for name, s in distinct.items()}
    memberships = {t.name: next(computed[n] for n, s in distinct.items() if _same(s, shadows[t.shadows]))
                   for t in candidates}
    made = choose_all(spec, keep, targets, distinct, shadows[threat.shadows], blocks, choices)
    chosen = np.stack([memberships[c.threat_model][c.attack][row] for row, c in enumerate(made)])
    return Attacked(memberships[threat.name], made, chosen)


def attack_reference(spec: TaskSpec, keep: np.ndarray, targets: np.ndarray, scores: np.ndarray,
                     full_precision: ShadowSet, choices: dict | None = None) -> Attacked:
    """The full-precision reference's attacks: the oblivious attacker, the pool's models as its shadows."""
    oblivious = THREAT_MODELS.get("oblivious")
    return attack_targets(spec, keep, targets, scores, oblivious, [oblivious], {"full-precision": full_precision},
                          choices=choices)


def _same(a: ShadowSet, b: ShadowSet) -> bool:
    return a is b or (np.array_equal(a.models, b.models) and np.array_equal(a.scores, b.scores))


def evaluation_arrays(prefix: str, attacked: Attacked) -> dict[str, np.ndarray]:
    return {**{f"{prefix}membership__{k}": v for k, v in attacked.membership.items()},
            f"{prefix}strongest_membership": attacked.chosen}
