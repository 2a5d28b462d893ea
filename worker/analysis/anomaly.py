"""Anomaly scores per namespace, learned from the stream itself.

For the event at position p of its namespace, its history is every earlier event except
the ``horizon`` most recent ones (the warm-up block is never excluded): h = p during the
warm-up, else max(p - horizon, warm_up). Leaving the recent past out is what makes a burst
of repeats keep scoring high until its kind has been part of the stream for a while,
instead of vouching for itself from its second line on. The score mixes two distances:
- to the centroid of the history (the vendor's method: cosine to the mean of normal
  content; alerts are rare enough not to move the mean), and
- the mean cosine distance to its ``neighbours`` nearest events in the history (pgvector).
With a ``focus``, that mix is the event's *novelty* and its score is novelty x P(alert),
the zero-shot probability that it reads like the focus's alert descriptions rather than its
routine ones: a new kind of failure alerts, a new kind of status line much less.
The threshold is the ``quantile`` of the scores after the warm-up, seeded when the warm-up
ends with each warm-up event's score against the other warm-up events; nothing alerts
during the warm-up. Every score counts, alerts included: a threshold that starts too low
must be able to rise. Older scores fade with a ``half_life`` (in events), so the threshold
follows the stream's recent scores: novelty falls as the history grows, and a threshold
learned on the early, more novel part of a stream would miss every later incident
(docs/analysis.md has the measurements behind this and the defaults).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pgvector import Vector

from worker.analysis import scoring
from worker.analysis.config import Anomaly
from worker.analysis.results import AnomalyResult, Neighbour, origin
from worker.analysis.state import Delta, NamespaceState, points_between
from worker.model import Change
from worker.sinks.postgres import Conn

METHOD = "centroid+knn"
FOCUSED = "centroid+knn*focus"
SHOWN_NEIGHBOURS = 5

NEAREST_PAST = """
SELECT q.i, p.id, p.position, 1 - (p.embedding <=> q.v) AS similarity
FROM unnest($1::vector[], $2::bigint[]) WITH ORDINALITY AS q(v, bound, i)
CROSS JOIN LATERAL (
    SELECT id, position, embedding FROM analysis_points
    WHERE namespace = $3 AND model = $4 AND position < q.bound
    ORDER BY embedding <=> q.v LIMIT $5
) p
"""


def history_end(position: int, spec: Anomaly) -> int:
    """Events at positions below this are the history of the event at ``position``."""
    if position < spec.warm_up:
        return position
    return max(position - spec.horizon, spec.warm_up)


@dataclass
class Scored:
    score: float
    threshold: float | None
    alert: bool
    novelty: float
    focus: float | None  # P(alert) under the focus descriptions
    centroid_distance: float
    neighbour_distance: float
    neighbours: list[tuple[str, float]]


@dataclass
class Past:
    """What a batch needs from Postgres, fetched in one go."""

    nearest: list[list[tuple[str, int, float]]]  # per event: (id, position, similarity)
    recent: list[tuple[int, np.ndarray]]  # stored events inside the batch's horizons
    warm_up: list[np.ndarray]  # the warm-up events, when this batch ends the warm-up


async def fetch_past(
    conn: Conn, spec: Anomaly, namespace: str, model: str, vectors: np.ndarray, start: int
) -> Past:
    bounds = [history_end(start + i, spec) for i in range(len(vectors))]
    rows = await conn.fetch(
        NEAREST_PAST,
        [Vector(v) for v in vectors],
        bounds,
        namespace,
        model,
        spec.neighbours,
    )
    nearest: list[list[tuple[str, int, float]]] = [[] for _ in range(len(vectors))]
    for r in rows:
        nearest[r["i"] - 1].append((r["id"], int(r["position"]), float(r["similarity"])))
    recent = await points_between(conn, namespace, model, min(bounds), start)
    ends_warm_up = start <= spec.warm_up < start + len(vectors) and spec.warm_up > 0
    warm = await points_between(conn, namespace, model, 0, spec.warm_up) if ends_warm_up else []
    return Past(nearest, recent, [v for _, v in warm])


def score_batch(
    spec: Anomaly,
    state: NamespaceState,
    vectors: np.ndarray,
    ids: Sequence[str],
    past: Past,
    delta: Delta,
    focus: np.ndarray | None = None,
) -> list[Scored]:
    """Score ``vectors`` (unit, stream order); record the histogram counts in ``delta``.

    ``focus``: the (alert, routine) vectors of the namespace's focus, if it has one.
    """
    weights = focus_weights(vectors, focus, spec)
    start = state.seen
    hist = state.hist.copy()
    decay = forgetting(spec)
    total = state.vector_sum.copy()  # every event before the current one
    recent = {p: v for p, v in past.recent}
    out: list[Scored] = []
    for i, x in enumerate(vectors):
        position = start + i
        if position == spec.warm_up and spec.warm_up > 0:
            warm = [*past.warm_up, *(vectors[j] for j in range(i) if start + j < spec.warm_up)]
            seeds = scoring.histogram(warm_up_scores(np.vstack(warm), spec, focus))
            hist += seeds
            delta.hist += seeds
        end = history_end(position, spec)
        # The history's sum: everything before, less the events inside the horizon.
        split = max(0, min(i, end - start))  # this batch's events before `end`
        history_sum = total - vectors[split:i].sum(axis=0)
        for p, v in recent.items():
            if end <= p < start:
                history_sum = history_sum - v
        centroid_d = centroid_distance(history_sum, end, x)
        hits = [(id_, s) for id_, p, s in past.nearest[i] if p < end]
        sims = vectors[:split] @ x
        hits += [(ids[j], float(sims[j])) for j in range(split)]
        hits = sorted(hits, key=lambda h: -h[1])[: spec.neighbours]
        neighbour_d = 1.0 - float(np.mean([s for _, s in hits])) if hits else 1.0
        novelty = spec.centroid_weight * centroid_d + (1 - spec.centroid_weight) * neighbour_d
        weight = None if weights is None else float(weights[i])
        value = novelty if weight is None else novelty * weight
        threshold = scoring.quantile(hist, spec.quantile) if position >= spec.warm_up else None
        alert = threshold is not None and value > threshold
        out.append(Scored(value, threshold, alert, novelty, weight, centroid_d, neighbour_d, hits))
        if position >= spec.warm_up:
            counts = scoring.histogram([value])
            hist = hist * decay + counts
            delta.hist = delta.hist * decay + counts
            delta.decays += 1
        total += x
    return out


def forgetting(spec: Anomaly) -> float:
    """What each counted score multiplies the histogram by before it is added (1: none)."""
    return 0.5 ** (1.0 / spec.half_life) if spec.half_life else 1.0


def focus_weights(
    vectors: np.ndarray, focus: np.ndarray | None, spec: Anomaly
) -> np.ndarray | None:
    """P(alert) of each vector against the focus's (alert, routine) vectors."""
    if focus is None or spec.focus is None:
        return None
    weights: np.ndarray = scoring.softmax(vectors @ focus.T, spec.focus.temperature)[:, 0]
    return weights


def warm_up_scores(
    vectors: np.ndarray, spec: Anomaly, focus: np.ndarray | None = None
) -> list[float]:
    """Each warm-up event scored against all the other warm-up events (leave one out)."""
    weights = focus_weights(vectors, focus, spec)
    sims = vectors @ vectors.T
    total = vectors.sum(axis=0)
    out = []
    for i in range(len(vectors)):
        others = np.delete(sims[i], i)
        nearest = np.sort(others)[::-1][: spec.neighbours]
        neighbour_d = 1.0 - float(nearest.mean()) if len(nearest) else 1.0
        centroid_d = centroid_distance(total - vectors[i], len(vectors) - 1, vectors[i])
        novelty = spec.centroid_weight * centroid_d + (1 - spec.centroid_weight) * neighbour_d
        out.append(novelty if weights is None else novelty * float(weights[i]))
    return out


def centroid_distance(vector_sum: np.ndarray, count: int, vector: np.ndarray) -> float:
    """1 - cosine similarity to the mean of ``count`` vectors summing to ``vector_sum``."""
    norm = float(np.linalg.norm(vector_sum))
    if count <= 0 or norm == 0:
        return 1.0
    return 1.0 - float(vector_sum @ vector) / norm


def build(
    change: Change, model: str, scored: Scored, position: int, spec: Anomaly
) -> AnomalyResult:
    return AnomalyResult(
        **origin(change, model),
        anomaly=scored.alert,
        score=round(scored.score, 6),
        threshold=None if scored.threshold is None else round(scored.threshold, 6),
        warm_up=position < spec.warm_up,
        method=METHOD if scored.focus is None else FOCUSED,
        novelty=round(scored.novelty, 6),
        focus=None if scored.focus is None else round(scored.focus, 6),
        centroid_distance=round(scored.centroid_distance, 6),
        neighbour_distance=round(scored.neighbour_distance, 6),
        neighbours=[
            Neighbour(id=i, similarity=round(s, 6)) for i, s in scored.neighbours[:SHOWN_NEIGHBOURS]
        ],
        seen=position,
    )
