"""RMIA (Zarifzadeh, Liu, Shokri, Shokri, ICML 2024) as pure functions on the benchmark's score arrays.

Same shapes as :mod:`.lira`: ``shadow_scores`` (S, N, Q) logit-scaled confidences
φ = log p_y - log sum_{j != y} p_j of S reference models on N pool examples under Q
queries, ``shadow_in`` (S, N) bool, ``target_scores`` (N, Q). Every attack returns (N,)
membership scores, higher = more likely a member.

The attack in three steps, and the choices made at each:

**1. Relative likelihood of x.** ``r(x) = Pr(x|θ) / Pr(x)`` with Pr(x|θ) = p_y(x), the
target's probability of the true class, which φ gives exactly: p_y = sigmoid(φ). Pr(x)
is the average of p_y over reference models:

* offline (references that did not train on x only), with the paper's linear
  approximation of the missing IN half, ``Pr(x) = ½(1+a)·mean_OUT + ½(1-a)``;
* online, ``Pr(x) = ½(mean_IN + mean_OUT)``. This equals the paper's plain mean over
  reference models whenever IN and OUT counts are equal (Privacy Meter's paired models,
  :func:`select_references`). With unequal counts we keep the ½ prior instead of
  letting the counts weigh the sides: with leave-one-out pools (every example in exactly
  half the pool) the other models hold a member of the target one IN model fewer than a
  non-member, so the plain mean would shift Pr(x) by the target's own membership.

Everything is computed in log space from φ (``log_expit``; the mean of p_y as a masked
logsumexp when it is small, ``log1p(-mean(1-p_y))`` when it is near 1), because
confident examples have p_y = 1 - 1e-10 and beyond, where ratios formed from
probabilities in float64 lose their digits or become exact ties.

**Queries.** The paper's code runs the pairwise test of step 2 once per query
(augmentation), each normalised by its own reference probability, and takes a majority
vote of the Q outcomes. A vote over Q pairwise tests is a Q-dimensional dominance count
that no single sort can answer (it needs the N x |Z| x Q comparisons we must avoid), so
we combine the per-query evidence before the test: log r(x) is the mean over queries of
log(p_y,q(x|θ) / Pr_q(x)), the geometric mean of the per-query ratios (the joint ratio if
queries were independent; LiRA here averages its per-query log ratios the same way).
With one query, as in ``digits-mlp``, this is exactly the paper's test.

**2. Pairwise test against the population.** x γ-dominates z when r(x) / r(z) > γ.
``score(x) = (number of z in Z \\ {x} that x γ-dominates) / |Z|``. Z is given by the
caller (for a pool target: its non-members). The test runs as
``log r(z) < log r(x) - log γ`` on the sorted population with ``searchsorted``:
O((N + |Z|) log |Z|) time and O(N + |Z|) memory, never N x |Z|.

**3. Self-comparison and the membership label.** x is never compared with itself. We
require γ >= 1, where x could not γ-dominate itself anyway (r(x) / r(x) = 1 is not > γ),
so leaving x out of the comparisons changes no count. What must not follow x out is the
*normaliser*: because Z is the target's non-members, |Z \\ {x}| is |Z| - 1 exactly for
non-members and |Z| for members. Dividing by it, the "fraction of the other population
samples" puts the label into every score: at equal counts c a non-member (c / (|Z| - 1))
lands above a member (c / |Z|), and with γ > 1 counts are coarse and tie massively. On
digits-mlp (fp32, target 0, offline, γ = 2: 36 distinct counts over 1,297 examples) the
per-example denominator turns AUC 0.544 into 0.124, an ordering that is the label
itself. Dividing every count by the same |Z| makes the score a function of r(x) and the
population's ratios only, the same function for members and non-members: two examples
with the same ratio get the same score whichever side of the population they are on.
γ < 1 is refused because there no choice is clean: counting x against itself gives every
non-member a free win, and not counting it makes members win the comparisons non-members
cannot make.

**Ties.** For a fixed population the count is a non-decreasing step function of log r(x),
so examples between two consecutive thresholds tie; with γ > 1 the steps are wide and
blocks mixing members and non-members form at the top. At 0.1% FPR with a few hundred
non-members no false positive is allowed, and a tie with one non-member removes the whole
block from the curve. We break ties deterministically by log r(x) itself
(``tie_break=True``): inside each group of equal counts we add
``step · (rank of log r(x) in the group) / (group size)``, with ``step = 1 / (2 |Z|)``
half the gap between consecutive counts, so the count is unchanged to within ``step`` and
its order is never overturned. Examples with exactly equal log r(x) stay tied (any order
among them would be arbitrary, e.g. the index order). Since the count is itself monotone
in log r(x), the tie-broken order is exactly the order of log r(x), whatever γ >= 1 and
population: on one target with a fixed population the pairwise test can only coarsen
Pr(x|θ) / Pr(x), and γ only sets how coarse the untie-broken score is.

**Defaults.** ``gamma = 1``: Privacy Meter's maintained implementation hard-codes
``ratio > 1``; the paper's research code uses γ = 2 together with a temperature-2,
soft-margin Taylor signal we do not compute. γ = 1 gives the finest untie-broken score:
a member then ties with a non-member only when its ratio is not larger, so the plain
score's ROC points are points of the ratio's ROC and the TPR at every FPR limit is the
same (only the trapezoid AUC differs: it credits a tie block with half of the members the
ratio puts below its non-member). With tie-breaking γ does not matter. ``a = 0.3``: Privacy Meter's default (it tunes a on
a grid 0, 0.1, ..., 1 by attacking a reference model); the paper's configs use 0.33 for
CIFAR-10, 0.6 for CIFAR-100 and 0.2 for the tabular datasets, so 0.3 is the paper's
image-data value, not one tuned for this task.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, log_expit

from .memo import remembered

OFFLINE_A = 0.3
GAMMA = 1.0


def select_references(shadow_in: np.ndarray, k: int | None, *, online: bool, seed: int = 0) -> np.ndarray:
    """(S, N) bool: exactly ``k`` reference models per example, drawn in a seeded order.

    offline: ``k`` models that did not train on the example; online: ``k/2`` that did and
    ``k/2`` that did not (``k`` even). Each example gets its own uniformly random choice
    (one seeded priority per model and example), so every example sees exactly ``k``
    models, as Privacy Meter's paired models guarantee, without all examples sharing the
    first ``k`` models of the pool. ``k=None`` selects every model. Usable for LiRA too
    (``references=`` of :func:`~mia_ptq_bench.attack.lira.lira_online`).
    """
    shadow_in = np.asarray(shadow_in)
    if shadow_in.ndim != 2 or shadow_in.dtype != bool:
        raise ValueError(f"shadow_in must be a 2-D bool array (S, N), got {shadow_in.dtype} {shadow_in.shape}")
    if k is None:
        return np.ones(shadow_in.shape, dtype=bool)
    if online and (k < 2 or k % 2):
        raise ValueError(f"online reference selection needs an even k >= 2 (k/2 IN and k/2 OUT), got {k}")
    if not online and k < 1:
        raise ValueError(f"offline reference selection needs k >= 1, got {k}")
    per_side = k // 2 if online else k
    sides = (("IN", shadow_in), ("OUT", ~shadow_in)) if online else (("OUT", ~shadow_in),)
    priority = np.random.default_rng(seed).random(shadow_in.shape)
    chosen = np.zeros(shadow_in.shape, dtype=bool)
    for name, side in sides:
        short = side.sum(axis=0) < per_side
        if short.any():
            raise ValueError(f"{int(short.sum())} examples have fewer than {per_side} {name} reference models")
        order = np.argsort(np.where(side, priority, 2.0), axis=0, kind="stable")
        rank = np.argsort(order, axis=0, kind="stable")
        chosen |= side & (rank < per_side)
    return chosen


def population_mask(population: np.ndarray, n: int) -> np.ndarray:
    """(N,) bool from a bool mask or an index array over the N examples; not empty."""
    population = np.asarray(population)
    if population.dtype == bool:
        if population.shape != (n,):
            raise ValueError(f"population mask must have shape ({n},), got {population.shape}")
        mask = population.copy()
    elif np.issubdtype(population.dtype, np.integer):
        if population.ndim != 1:
            raise ValueError(f"population indices must be 1-D, got shape {population.shape}")
        if population.size and (population.min() < 0 or population.max() >= n):
            raise ValueError(f"population indices must lie in [0, {n})")
        if np.unique(population).size != population.size:
            raise ValueError("population indices must not repeat")
        mask = np.zeros(n, dtype=bool)
        mask[population] = True
    else:
        raise ValueError(f"population must be a bool mask or an integer index array, got dtype {population.dtype}")
    if not mask.any():
        raise ValueError("the population is empty")
    return mask


def _check_scores(shadow_scores, shadow_in, target_scores, references):
    shadow_scores = np.asarray(shadow_scores, dtype=np.float64)
    target_scores = np.asarray(target_scores, dtype=np.float64)
    shadow_in = np.asarray(shadow_in)
    if shadow_scores.ndim != 3:
        raise ValueError(f"shadow_scores must be (S, N, Q), got shape {shadow_scores.shape}")
    if shadow_in.shape != shadow_scores.shape[:2] or shadow_in.dtype != bool:
        raise ValueError(f"shadow_in must be bool of shape {shadow_scores.shape[:2]}, got {shadow_in.dtype} "
                         f"{shadow_in.shape}")
    if target_scores.shape != shadow_scores.shape[1:]:
        raise ValueError(f"target_scores must have shape {shadow_scores.shape[1:]}, got {target_scores.shape}")
    if not (np.isfinite(shadow_scores).all() and np.isfinite(target_scores).all()):
        raise ValueError("scores must be finite")
    if references is None:
        references = np.ones(shadow_in.shape, dtype=bool)
    references = np.asarray(references)
    if references.shape != shadow_in.shape or references.dtype != bool:
        raise ValueError(f"references must be bool of shape {shadow_in.shape}, got {references.dtype} "
                         f"{references.shape}")
    return shadow_scores, shadow_in, target_scores, references


def _reference_mean(log_p: np.ndarray, complement_p: np.ndarray, mask: np.ndarray,
                    side: str) -> tuple[np.ndarray, np.ndarray]:
    """(log mean p_y, mean 1 - p_y) over the models in ``mask``, per example and query (N, Q).

    ``log_p`` = log p_y and ``complement_p`` = 1 - p_y of every shadow score (S, N, Q), computed
    once by the caller for both sides.

    The log of the mean comes from a masked logsumexp of log p_y, which neither
    underflows for hopeless examples nor needs p_y itself; the mean of 1 - p_y =
    sigmoid(-φ) keeps the digits of confident examples, whose p_y rounds towards 1.
    """
    count = mask.sum(axis=0)
    if (count == 0).all():
        raise ValueError(f"no {side} reference model for any example; use more reference models")
    selected = mask[..., None]
    peak = np.where(selected, log_p, -np.inf).max(axis=0)
    total = np.exp(np.where(selected, log_p - peak, -np.inf)).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):  # examples with no model here: NaN, filled by the caller
        log_mean = peak + np.log(total) - np.log(count)[:, None]
        complement = np.where(selected, complement_p, 0.0).sum(axis=0) / count[:, None]
    return log_mean, complement


def _borrow(mine: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """An example with no reference model on one side uses its other side's mean (few reference models)."""
    missing = np.isnan(mine[1])
    return np.where(missing, other[0], mine[0]), np.where(missing, other[1], mine[1])


def _log_mixture(weight: float, log_mean: np.ndarray, complement: np.ndarray) -> np.ndarray:
    """log(weight · m + 1 - weight) for m = exp(log_mean) = 1 - complement, accurate for m near 0 and near 1."""
    with np.errstate(divide="ignore"):  # log(0) = -inf is the right value for a = 1 or all p_y = 0
        low = np.logaddexp(np.log(weight) + log_mean, np.log1p(-weight))
        high = np.log1p(-weight * complement)
    return np.where(weight * np.exp(log_mean) + (1.0 - weight) <= 0.5, low, high)


def relative_likelihood(shadow_scores: np.ndarray, shadow_in: np.ndarray, target_scores: np.ndarray, *,
                        online: bool, references: np.ndarray | None = None, a: float = OFFLINE_A,
                        memo: dict | None = None) -> np.ndarray:
    """(N,) log(Pr(x|θ) / Pr(x)), the mean over queries of the per-query log ratios (module docstring).

    ``memo``, optional: a dict kept with these arrays, in which the online and offline attacks share
    the shadows' probabilities and reference means (same numbers); used only without ``references``.
    """
    if not online and not 0.0 <= a <= 1.0:
        raise ValueError(f"offline a must lie in [0, 1], got {a}")
    if references is not None:
        memo = None
    shadow_scores, shadow_in, target_scores, references = _check_scores(shadow_scores, shadow_in, target_scores,
                                                                        references)
    outside, inside = references & ~shadow_in, references & shadow_in
    log_p, complement_p = remembered(memo, ("rmia", "p"),
                                     lambda: (log_expit(shadow_scores), expit(-shadow_scores)))
    out_mean = remembered(memo, ("rmia", "OUT"), lambda: _reference_mean(log_p, complement_p, outside, "OUT"))
    if online or not outside.any(axis=0).all():
        in_mean = remembered(memo, ("rmia", "IN"), lambda: _reference_mean(log_p, complement_p, inside, "IN"))
        out_mean, in_mean = _borrow(out_mean, in_mean), _borrow(in_mean, out_mean)
        if np.isnan(out_mean[1]).any():
            raise ValueError("some examples have no reference model at all")
        (log_in, comp_in) = in_mean
    log_out, comp_out = out_mean
    if online:
        log_prior = _log_mixture(1.0, np.logaddexp(log_in, log_out) - np.log(2.0), (comp_in + comp_out) / 2)
    else:
        log_prior = _log_mixture((1.0 + a) / 2, log_out, comp_out)
    return (log_expit(target_scores) - log_prior).mean(axis=-1)


def pairwise_score(log_ratio: np.ndarray, population: np.ndarray, *, gamma: float = GAMMA,
                   tie_break: bool = True) -> np.ndarray:
    """Share of the population that x γ-dominates (never x itself), over |Z|; ties broken by log r(x).

    ``log_ratio`` (N,) from :func:`relative_likelihood`; ``population`` a bool mask or
    index array over the same N examples; ``gamma`` >= 1 (module docstring, step 3).
    """
    log_ratio = np.asarray(log_ratio, dtype=np.float64)
    if log_ratio.ndim != 1:
        raise ValueError(f"log_ratio must be 1-D, got shape {log_ratio.shape}")
    if np.isnan(log_ratio).any():
        raise ValueError("log_ratio contains NaN")
    if not (np.isfinite(gamma) and gamma >= 1):
        raise ValueError(f"gamma must be a finite number >= 1 (below 1 an example would dominate itself), got {gamma}")
    members = population_mask(population, log_ratio.size)
    size = int(members.sum())
    # log γ >= 0, so log r(x) - log γ <= log r(x) after rounding too: no example is below
    # its own threshold, and the count over Z is the count over Z \ {x}.
    count = np.searchsorted(np.sort(log_ratio[members]), log_ratio - np.log(gamma), side="left")
    fraction = count / size
    return _break_ties(fraction, log_ratio, size) if tie_break else fraction


def _break_ties(fraction: np.ndarray, log_ratio: np.ndarray, size: int) -> np.ndarray:
    order = np.lexsort((log_ratio, fraction))
    f, r = fraction[order], log_ratio[order]
    index = np.arange(f.size)
    new_group = np.r_[True, f[1:] != f[:-1]]
    new_key = new_group | np.r_[True, r[1:] != r[:-1]]
    group_start = np.maximum.accumulate(np.where(new_group, index, 0))
    key_start = np.maximum.accumulate(np.where(new_key, index, 0))
    group = np.cumsum(new_group) - 1
    group_size = np.bincount(group)[group]
    step = 1.0 / (2.0 * size)  # half the gap between consecutive counts
    broken = f + step * (key_start - group_start) / group_size
    if (np.diff(broken)[new_key[1:]] <= 0).any():
        raise ValueError("tie-breaking needs finer steps than float64 offers here; pass tie_break=False")
    result = np.empty_like(broken)
    result[order] = broken
    return result


def rmia_offline(shadow_scores: np.ndarray, shadow_in: np.ndarray, target_scores: np.ndarray,
                 population: np.ndarray, *, references: np.ndarray | None = None, a: float = OFFLINE_A,
                 gamma: float = GAMMA, tie_break: bool = True, memo: dict | None = None) -> np.ndarray:
    """RMIA with reference models that did not train on x; the IN scores do not enter the result.

    ``references`` (S, N) bool restricts the reference models per example (e.g.
    :func:`select_references`); every example needs at least one OUT reference.
    """
    log_ratio = relative_likelihood(shadow_scores, shadow_in, target_scores, online=False, references=references, a=a,
                                    memo=memo)
    return pairwise_score(log_ratio, population, gamma=gamma, tie_break=tie_break)


def rmia_online(shadow_scores: np.ndarray, shadow_in: np.ndarray, target_scores: np.ndarray,
                population: np.ndarray, *, references: np.ndarray | None = None, gamma: float = GAMMA,
                tie_break: bool = True, memo: dict | None = None) -> np.ndarray:
    """RMIA with IN and OUT reference models; every example needs at least one of each."""
    log_ratio = relative_likelihood(shadow_scores, shadow_in, target_scores, online=True, references=references,
                                    memo=memo)
    return pairwise_score(log_ratio, population, gamma=gamma, tie_break=tie_break)
