"""How far another draw of its pool could move a result's means: a delete-a-group jackknife over its models.

A result's interval, ``s / sqrt(targets)``, treats its targets as independent draws. Their
attacks are not: each target is attacked with the other pool models as shadows, nearly the
same set for every target, and under the adaptive threats the shadows *are* the other
targets (15 of them on fashion-mnist-resnet). A pool trained again (on another CPU, whose
rounding makes every model another draw of its training noise) moves all targets' numbers
together, further than ``s / sqrt(targets)`` allows (docs/reproducibility.md).

The jackknife measures that on one pool. The models are dealt into one group per target
(the target, and the models that are no target round-robin by index); each group is left
out in turn, as target and as shadow, and the attacks and the choice of the strongest are rerun
on the rest (the other targets keep their blocks of that choice). The spread of the
leave-one-group-out means gives the standard error

    SE² = (g - 1) / g · Σ_k (θ_(k) - mean_k θ_(k))²          (g groups)

For a number no shadow enters (test accuracy, the global threshold) leaving out a group
leaves out its one target and nothing else, and SE is exactly ``s / sqrt(targets)``; where
the targets share their shadows it is larger. It errs on the wide side: it leaves out whole
models, membership masks included, which another draw of the pool keeps, and a TPR at low FPR
is not a smooth statistic. The price is a rerun of the evaluation's attacks per target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..attack import THREAT_MODELS, ShadowSet, ThreatModel
from ..metrics.select import NoStandIn, attack_targets, target_blocks
from ..spec.schema import TaskSpec
from .compare import PoolSpread, headline_numbers
from .compute import build_evaluation
from .schema import Result
from .verify import saved_shadows

# Kept standard errors (benchmarks/cross_machine.py --spread-cache) name it: 1 kept each block of targets whole
# (the strongest strategy's choice) where a left-out target was dropped from it.
JACKKNIFE_VERSION = 1


def deal_groups(targets: Sequence[int], models: Sequence[int]) -> list[list[int]]:
    """One group per target: the target, then every model that is no target, dealt round-robin in index order."""
    groups = [[int(t)] for t in targets]
    others = sorted(set(int(m) for m in models) - set(int(t) for t in targets))
    for position, model in enumerate(others):
        groups[position % len(groups)].append(model)
    return groups


def grouped_jackknife(statistic: Callable[[list[int]], dict[str, float]], groups: list[list[int]]) -> dict[str, float]:
    """Standard error of every number ``statistic`` returns, from its values with each group left out
    (``statistic(left_out_models)``); nothing with fewer than 2 groups."""
    if len(groups) < 2:
        return {}
    values = [statistic(group) for group in groups]
    g = len(groups)
    return {name: float(np.sqrt((g - 1) / g * np.sum((column - column.mean()) ** 2)))
            for name in values[0] for column in [np.array([v[name] for v in values])]}


def pool_standard_errors(spec: TaskSpec, keep: np.ndarray, targets: np.ndarray, target_scores: np.ndarray,
                         test_predictions: np.ndarray, test_labels: np.ndarray, threat: ThreatModel,
                         candidates: list[ThreatModel], shadows: dict[str, ShadowSet]) -> dict[str, float]:
    """Jackknife standard errors of one evaluation's headline means (``compare.headline_numbers``' names),
    from the arrays it was computed from (those of ``metrics.select.attack_targets`` and the targets'
    test predictions); none where leaving a group out leaves some block of targets no shadow to choose on."""
    models = {int(m) for s in shadows.values() for m in s.models}
    blocks = target_blocks(targets)

    def means(left_out: list[int]) -> dict[str, float]:
        rows = ~np.isin(targets, left_out)
        kept = {kind: s.dropping(left_out) for kind, s in shadows.items()}
        # The other targets keep their blocks (and so their stand-ins): a pool drawn again would not reshuffle them.
        their_blocks = [[t for t in block if t not in left_out] for block in blocks]
        attacked = attack_targets(spec, keep, targets[rows], target_scores[rows], threat, candidates, kept, their_blocks)
        evaluation = build_evaluation(keep, targets[rows], attacked.membership, test_predictions[rows], test_labels,
                                      attacked.choices, attacked.chosen)
        return {name: stat.mean for name, stat in headline_numbers(evaluation).items()}

    try:
        return grouped_jackknife(means, deal_groups(targets, sorted(models)))
    except NoStandIn:  # some block of the rest has no shadow left to stand in for its targets: nothing measured
        return {}


def reference_standard_errors(spec: TaskSpec, keep: np.ndarray, targets: np.ndarray, scores: np.ndarray,
                              test_predictions: np.ndarray, test_labels: np.ndarray,
                              full_precision: ShadowSet) -> dict[str, float]:
    """``pool_standard_errors`` of the full-precision reference: the oblivious attacker, the pool as its shadows."""
    oblivious = THREAT_MODELS.get("oblivious")
    return pool_standard_errors(spec, keep, targets, scores, test_predictions, test_labels, oblivious, [oblivious],
                                {"full-precision": full_precision})


def result_pool_spread(spec: TaskSpec, result: Result, arrays: dict[str, np.ndarray],
                       reference: dict[str, float] | None = None) -> PoolSpread:
    """``pool_standard_errors`` of a result's two evaluations, from its saved arrays (``results/io.py``);
    ``reference``: the full-precision reference's, where another result of the same run gave them already."""
    candidates, shadows = saved_shadows(arrays, result)
    keep, targets, labels = arrays["keep"], arrays["targets"], arrays["test_labels"]
    if reference is None:
        reference = reference_standard_errors(spec, keep, targets, arrays["reference_scores"],
                                              arrays["reference_test_predictions"], labels, shadows["full-precision"])
    return PoolSpread(
        quantized=pool_standard_errors(spec, keep, targets, arrays["target_scores"], arrays["test_predictions"],
                                       labels, THREAT_MODELS.get(result.threat_model), candidates, shadows),
        reference=reference)
