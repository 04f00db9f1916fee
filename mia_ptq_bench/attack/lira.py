"""LiRA (Carlini et al., 2022) and the global-threshold baseline, as pure functions on arrays.

Shapes: ``shadow_scores`` (S, N, Q) logit-scaled confidences of S shadow models on
N examples under Q queries; ``shadow_in`` (S, N) bool, whether each shadow trained
on each example; ``target_scores`` (N, Q). Every attack returns (N,) membership
scores where higher means "more likely a member".
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

from .memo import remembered

EPS = 1e-30  # keeps a zero spread finite, as the reference code does


def first_k(mask: np.ndarray, k: int) -> np.ndarray:
    """Keep only the first ``k`` True entries of each column (along the shadow axis)."""
    return mask & (np.cumsum(mask, axis=0) <= k)


def masked_median(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Median over axis 0 of ``values`` (S, N, Q) where ``mask`` (S, N); every column needs one entry.

    Sorting with the unselected entries pushed to the end, then reading the middle one or
    two, is several times faster than ``np.nanmedian`` and gives the same numbers.
    """
    ordered = np.sort(np.where(mask[..., None], values, np.inf), axis=0)
    count = mask.sum(axis=0)
    low = np.take_along_axis(ordered, ((count - 1) // 2)[None, :, None].repeat(values.shape[2], axis=2), axis=0)[0]
    high = np.take_along_axis(ordered, (count // 2)[None, :, None].repeat(values.shape[2], axis=2), axis=0)[0]
    return (low + high) / 2


def masked_std(values: np.ndarray, mask: np.ndarray, pooled: bool = False) -> np.ndarray | float:
    """Population std (ddof 0) over axis 0 where ``mask``; ``pooled``: one std over every selected entry."""
    selected = np.broadcast_to(mask[..., None], values.shape)
    if pooled:
        return float(values[selected].std())
    count = mask.sum(axis=0)[:, None]
    mean = np.where(selected, values, 0.0).sum(axis=0) / count
    return np.sqrt(np.where(selected, (values - mean) ** 2, 0.0).sum(axis=0) / count)


def gaussian_fit(shadow_scores: np.ndarray, mask: np.ndarray, fixed_variance: bool, *,
                 memo: dict | None = None, key: tuple | None = None):
    """Per example and query: centre = median, spread = std (ddof 0) of the selected shadows.

    With ``fixed_variance`` one spread over every selected score replaces the per-example ones.
    A column with no selected shadow has a NaN centre (``fit_sides`` fills it). A column with fewer
    than two has no spread of its own (one shadow's std is 0, and the ratio would blow up on exactly
    that example): it takes the mean spread of the columns with two or more (``borrowed_spread``).
    ``memo`` and ``key`` (naming ``mask``) let the attacks on the same arrays share the median and the fits.
    """
    if not mask.any():
        raise ValueError("no example has a shadow model on this side; use more shadow models")

    def fit():
        with np.errstate(invalid="ignore", divide="ignore"):
            centre = remembered(memo, key and (*key, "median"), lambda: masked_median(shadow_scores, mask)).copy()
            if fixed_variance:
                spread = np.full_like(centre, masked_std(shadow_scores, mask, pooled=True))
            else:
                spread = masked_std(shadow_scores, mask)
                spread[mask.sum(axis=0) < 2] = np.nan
        empty = ~mask.any(axis=0)
        centre[empty], spread[empty] = np.nan, np.nan
        return centre, borrowed_spread(spread)

    return remembered(memo, key and (*key, "fit", fixed_variance), fit)


def fit_sides(shadow_scores: np.ndarray, inside: np.ndarray, outside: np.ndarray, fixed_variance: bool, *,
              memo: dict | None = None, key: tuple | None = None):
    """(mu_in, sd_in, mu_out, sd_out), each (N, Q); an example with no shadow on one side borrows.

    With few shadows (an adaptive attacker that quantized only some models) an example can
    have every shadow on one side. Its missing centre is then its other side's centre moved
    by the mean IN - OUT gap over the examples that have both (its spread, as that of an example
    with a single shadow on a side, is already the side's mean: ``gaussian_fit``): the best guess
    the attacker's own shadows support.
    """
    mu_in, sd_in = gaussian_fit(shadow_scores, inside, fixed_variance, memo=memo, key=key and (*key, "in"))
    mu_out, sd_out = gaussian_fit(shadow_scores, outside, fixed_variance, memo=memo, key=key and (*key, "out"))
    missing_in, missing_out = np.isnan(mu_in), np.isnan(mu_out)
    if missing_in.any() or missing_out.any():
        both = ~(missing_in | missing_out)
        if not both.any(axis=0).all():
            raise ValueError("no example has shadow models on both sides; use more shadow models")
        gap = np.where(both, mu_in - mu_out, 0.0).sum(axis=0) / both.sum(axis=0)
        mu_in = np.where(missing_in, mu_out + gap, mu_in)
        mu_out = np.where(missing_out, mu_in - gap, mu_out)
    return mu_in, sd_in, mu_out, sd_out


def borrowed_spread(spread: np.ndarray) -> np.ndarray:
    """``spread`` (N, Q) with each undetermined (NaN) entry replaced by its query's mean over the determined ones."""
    undetermined = np.isnan(spread)
    if not undetermined.any():
        return spread
    if undetermined.all(axis=0).any():
        raise ValueError("no example has two shadow models on one side, so no spread can be estimated; "
                         "use more shadow models or a fixed variance")
    return np.where(undetermined, np.nanmean(spread, axis=0), spread)


def _split(shadow_in: np.ndarray, equalize_counts: bool,
           references: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    inside, outside = shadow_in.astype(bool), ~shadow_in.astype(bool)
    if references is not None:  # per-example subsets, e.g. rmia.select_references
        references = np.asarray(references)
        if references.shape != inside.shape or references.dtype != bool:
            raise ValueError(f"references must be bool of shape {inside.shape}, got {references.dtype} "
                             f"{references.shape}")
        inside, outside = inside & references, outside & references
    if equalize_counts:  # the reference code's truncation to the smallest count over examples
        inside = first_k(inside, _smallest_present(inside))
        outside = first_k(outside, _smallest_present(outside))
    return inside, outside


def _smallest_present(side: np.ndarray) -> int:
    """The fewest shadows any example has on this side, among examples with two or more: an example with
    fewer borrows its spread (``gaussian_fit``) instead of cutting every example to one shadow, whose spread is 0."""
    counts = side.sum(axis=0)
    enough = counts[counts >= 2]
    return int(enough.min()) if enough.size else int(counts.max(initial=0))


def _memo_key(equalize_counts: bool, references: np.ndarray | None) -> tuple | None:
    """What the IN/OUT masks depend on besides the arrays: memoised only without per-call references."""
    return None if references is not None else ("lira", equalize_counts)


def lira_online(shadow_scores: np.ndarray, shadow_in: np.ndarray, target_scores: np.ndarray, *,
                fixed_variance: bool = False, fixed_variance_out: str = "out", equalize_counts: bool = False,
                references: np.ndarray | None = None, memo: dict | None = None) -> np.ndarray:
    """Likelihood ratio log N(s; in) - log N(s; out), averaged over queries.

    ``references`` (S, N) bool, optional: only these shadows serve each example. ``memo``, optional:
    a dict kept with these arrays, in which the LiRA variants share their fits (same numbers).
    """
    inside, outside = _split(shadow_in, equalize_counts, references)
    mu_in, sd_in, mu_out, sd_out = fit_sides(shadow_scores, inside, outside, fixed_variance, memo=memo,
                                             key=_memo_key(equalize_counts, references))
    if fixed_variance and fixed_variance_out == "in":
        sd_out = sd_in  # reference-code quirk, only on request
    ratio = norm.logpdf(target_scores, mu_in, sd_in + EPS) - norm.logpdf(target_scores, mu_out, sd_out + EPS)
    return ratio.mean(axis=-1)


def lira_offline(shadow_scores: np.ndarray, shadow_in: np.ndarray, target_scores: np.ndarray, *,
                 fixed_variance: bool = False, test: str = "one-sided", equalize_counts: bool = False,
                 references: np.ndarray | None = None, memo: dict | None = None) -> np.ndarray:
    """OUT shadows only. One-sided (LiRA paper): log P[Z < s] under OUT. Two-sided (reference code): -log N(s; out).

    ``references`` (S, N) bool, optional: only these shadows serve each example. ``memo`` as for
    :func:`lira_online`.
    """
    inside, outside = _split(shadow_in, equalize_counts, references)
    key = _memo_key(equalize_counts, references)
    if outside.any(axis=0).all():
        mu_out, sd_out = gaussian_fit(shadow_scores, outside, fixed_variance, memo=memo, key=key and (*key, "out"))
    else:  # the IN shadows only say where OUT lies through the gap (fit_sides)
        _, _, mu_out, sd_out = fit_sides(shadow_scores, inside, outside, fixed_variance, memo=memo, key=key)
    if test == "one-sided":
        per_query = norm.logcdf(target_scores, mu_out, sd_out + EPS)
    elif test == "two-sided":
        per_query = -norm.logpdf(target_scores, mu_out, sd_out + EPS)
    else:
        raise ValueError(f"unknown offline test {test!r}")
    return per_query.mean(axis=-1)


def global_threshold(target_scores: np.ndarray) -> np.ndarray:
    """The loss-style baseline: the target's own confidence, averaged over queries."""
    return np.asarray(target_scores, dtype=np.float64).mean(axis=-1)
