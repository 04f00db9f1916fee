"""An independent, deliberately plain LiRA and ROC: loops over examples, scipy's norm, sorted thresholds.

Shares no code with the package, so agreement with it checks the vectorised implementation.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm


def lira(shadow_scores, shadow_in, target_scores, online=True, fixed=False, one_sided=True):
    shadows, examples, _ = shadow_scores.shape
    ins = [shadow_scores[shadow_in[:, j], j, :] for j in range(examples)]
    outs = [shadow_scores[~shadow_in[:, j], j, :] for j in range(examples)]
    if fixed:
        global_in = np.std(np.concatenate(ins))
        global_out = np.std(np.concatenate(outs))
    result = np.empty(examples)
    for j in range(examples):
        q = target_scores[j]
        mu_out = np.median(outs[j], axis=0)
        sd_out = (global_out if fixed else np.std(outs[j], axis=0)) + 1e-30
        if online:
            mu_in = np.median(ins[j], axis=0)
            sd_in = (global_in if fixed else np.std(ins[j], axis=0)) + 1e-30
            value = norm.logpdf(q, mu_in, sd_in) - norm.logpdf(q, mu_out, sd_out)
        elif one_sided:
            value = norm.logcdf(q, mu_out, sd_out)
        else:
            value = -norm.logpdf(q, mu_out, sd_out)
        result[j] = np.mean(value)
    return result


def roc_points(labels, scores):
    """(fpr, tpr) after each distinct threshold, highest first, starting at (0, 0)."""
    labels = np.asarray(labels, bool)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    pos, neg = y.sum(), (~y).sum()
    fpr, tpr, tp, fp = [0.0], [0.0], 0, 0
    for i in range(len(s)):
        tp += y[i]
        fp += not y[i]
        if i == len(s) - 1 or s[i + 1] != s[i]:
            fpr.append(fp / neg)
            tpr.append(tp / pos)
    return np.array(fpr), np.array(tpr)


def tpr_at(labels, scores, limit):
    fpr, tpr = roc_points(labels, scores)
    return max(t for f, t in zip(fpr, tpr) if f < limit)


def auc(labels, scores):
    fpr, tpr = roc_points(labels, scores)
    return float(sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(fpr) - 1)))


def t_interval(values):
    x = np.asarray(values, float)
    from scipy.stats import t

    half = t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return x.mean() - half, x.mean() + half
