"""The scoring math, pure numpy: probabilities from similarities, votes, quantiles.

Kept apart from I/O so it is unit-tested directly and shared by the worker and `evaluate`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from worker.analysis.config import UNKNOWN, Action, Rule


def softmax(similarities: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise softmax of cosine similarities / temperature (numerically stable)."""
    z = np.asarray(similarities, dtype=np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


def zero_shot(vectors: np.ndarray, prototypes: np.ndarray, temperature: float) -> np.ndarray:
    """(n, labels) probabilities from the similarity of each vector to each label vector."""
    return softmax(normalise(vectors) @ prototypes.T, temperature)


def knn_vote(
    neighbours: Sequence[Sequence[tuple[int, float]]], labels: int, temperature: float
) -> np.ndarray:
    """(n, labels) probabilities: each neighbour votes for its label with weight
    exp(similarity / temperature), so near examples count more than far ones. A row
    without neighbours is uniform."""
    out = np.full((len(neighbours), labels), 1.0 / labels)
    for row, hits in enumerate(neighbours):
        if not hits:
            continue
        sims = np.array([s for _, s in hits], dtype=np.float64)
        weights = np.exp((sims - sims.max()) / temperature)
        votes = np.zeros(labels)
        np.add.at(votes, [label for label, _ in hits], weights)
        out[row] = votes / votes.sum()
    return out


def combine(zero: np.ndarray | None, few: np.ndarray | None, few_weight: float) -> np.ndarray:
    """Mix the two distributions (either may be absent)."""
    if zero is None and few is None:
        raise ValueError("nothing to combine")
    if zero is None:
        assert few is not None
        return few
    if few is None:
        return zero
    return (1 - few_weight) * zero + few_weight * few


def top_k(probabilities: np.ndarray, names: Sequence[str], k: int) -> list[tuple[str, float]]:
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(names[i], float(probabilities[i])) for i in order]


SEVERITY = {Action.ALLOW: 0, Action.REVIEW: 1, Action.BLOCK: 2}


def moderate(
    probabilities: dict[str, float], rules: Sequence[Rule], out_of_scope: float = 0.0
) -> tuple[Action, Rule | None]:
    """The strictest action among the rules that match (the first on a tie), else allow.
    A rule on ``unknown`` matches on the out-of-scope score, the others on their label's
    probability."""
    matched = [
        r
        for r in rules
        if (out_of_scope if r.label == UNKNOWN else probabilities.get(r.label, 0.0)) >= r.min_score
    ]
    if not matched:
        return Action.ALLOW, None
    rule = max(matched, key=lambda r: SEVERITY[r.action])
    return rule.action, rule


def normalise(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    out: np.ndarray = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)
    return out


# ---- running quantile over a fixed-bin histogram -------------------------------------
# Scores are distances in [0, 2]. Fixed bins make the histogram additive: replicas add
# their counts to the same row in Postgres and agree on the quantile.

HIST_BINS = 1000
HIST_MAX = 2.0


def histogram(scores: Sequence[float]) -> np.ndarray:
    counts, _ = np.histogram(
        np.clip(np.asarray(scores, dtype=np.float64), 0.0, HIST_MAX - 1e-12),
        bins=HIST_BINS,
        range=(0.0, HIST_MAX),
    )
    return counts.astype(np.float64)


def quantile(counts: np.ndarray, q: float) -> float | None:
    """The q-quantile of the scores counted (upper edge of the bin that reaches it)."""
    total = float(counts.sum())
    if total <= 0:
        return None
    index = int(np.searchsorted(np.cumsum(counts), q * total, side="left"))
    return (min(index, HIST_BINS - 1) + 1) * HIST_MAX / HIST_BINS
