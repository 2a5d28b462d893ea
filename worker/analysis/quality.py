"""Quality metrics for `evaluate`: classification and anomaly detection, numpy only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PRF:
    precision: float
    recall: float
    f1: float
    support: int


def prf(truth: Sequence[bool], predicted: Sequence[bool]) -> PRF:
    """Precision, recall and F1 of the positive class (0.0 where undefined)."""
    t = np.asarray(truth, dtype=bool)
    p = np.asarray(predicted, dtype=bool)
    tp = int(np.sum(t & p))
    precision = tp / int(p.sum()) if p.any() else 0.0
    recall = tp / int(t.sum()) if t.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return PRF(precision, recall, f1, int(t.sum()))


def accuracy(truth: Sequence[str], predicted: Sequence[str]) -> float:
    if not truth:
        return 0.0
    return sum(a == b for a, b in zip(truth, predicted, strict=True)) / len(truth)


def per_class(truth: Sequence[str], predicted: Sequence[str]) -> dict[str, PRF]:
    labels = sorted(set(truth))
    return {
        label: prf([t == label for t in truth], [p == label for p in predicted]) for label in labels
    }


def macro_f1(truth: Sequence[str], predicted: Sequence[str]) -> float:
    scores = per_class(truth, predicted)
    return float(np.mean([s.f1 for s in scores.values()])) if scores else 0.0


def average_precision(truth: Sequence[bool], scores: Sequence[float]) -> float:
    """PR-AUC as average precision: mean of the precision at each positive's rank (ties
    are ranked together, so the figure does not depend on input order)."""
    t = np.asarray(truth, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if not t.any():
        return 0.0
    distinct = np.unique(s)[::-1]  # thresholds, high to low
    precision_sum, previous_recall, positives = 0.0, 0.0, int(t.sum())
    for threshold in distinct:
        chosen = s >= threshold
        tp = int(np.sum(t & chosen))
        recall = tp / positives
        precision = tp / int(chosen.sum())
        precision_sum += (recall - previous_recall) * precision
        previous_recall = recall
    return precision_sum


def auroc(truth: Sequence[bool], scores: Sequence[float]) -> float:
    """Area under the ROC curve (Mann-Whitney U, average ranks for ties)."""
    t = np.asarray(truth, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    positives, negatives = int(t.sum()), int((~t).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_scores = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = float(ranks[t].sum()) - positives * (positives + 1) / 2
    return u / (positives * negatives)
