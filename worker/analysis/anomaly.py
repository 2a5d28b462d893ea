"""Anomaly scores per namespace, learned from the stream itself and kept in Postgres.

Two distances, for each event in stream order:
- to the centroid of the namespace's normal content (the vendor's method), and
- to its nearest neighbours among the namespace's past events (pgvector), ignoring the
  ``horizon`` most recent ones: a burst of repeats is not its own evidence of normality,
  so it keeps alerting until its kind has been part of the stream for a while.
The alert threshold is a quantile of the namespace's own score distribution (an additive
histogram), and nothing alerts during the warm-up.

All state (event count, centroid sum, score histogram, past points) lives in Postgres and
changes only in the transaction that stores the offsets: a restart, a replay or another
replica sees exactly what was committed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pgvector import Vector

from worker.analysis import scoring
from worker.analysis.config import Anomaly
from worker.analysis.results import AnomalyResult, Neighbour, result_key
from worker.decode import NO_TIME, Change
from worker.events import SourcePosition
from worker.store import Conn

METHOD = "knn-horizon+centroid"

NEAREST_PAST = """
SELECT q.i, p.id, 1 - (p.embedding <=> q.v) AS similarity
FROM unnest($1::vector[], $2::bigint[]) WITH ORDINALITY AS q(v, bound, i)
CROSS JOIN LATERAL (
    SELECT id, embedding FROM anomaly_points
    WHERE namespace = $3 AND model = $4 AND position < q.bound
    ORDER BY embedding <=> q.v LIMIT $5
) p
ORDER BY q.i, similarity DESC
"""

LOAD_STATE = """
SELECT scored, normal, centroid_sum, score_hist FROM anomaly_state
WHERE namespace = $1 AND model = $2
"""

# Additive: every term is a sum, so replicas (and retried transactions) compose.
ADD_STATE = """
INSERT INTO anomaly_state AS s (namespace, model, scored, normal, centroid_sum, score_hist)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (namespace, model) DO UPDATE SET
    scored = s.scored + EXCLUDED.scored,
    normal = s.normal + EXCLUDED.normal,
    centroid_sum = (SELECT array_agg(a + b ORDER BY i)
                    FROM unnest(s.centroid_sum, EXCLUDED.centroid_sum) WITH ORDINALITY u(a, b, i)),
    score_hist = (SELECT array_agg(a + b ORDER BY i)
                  FROM unnest(s.score_hist, EXCLUDED.score_hist) WITH ORDINALITY u(a, b, i)),
    updated_at = now()
"""

ADD_POINTS = """
INSERT INTO anomaly_points (namespace, model, position, id, embedding)
SELECT $1, $2, * FROM unnest($3::bigint[], $4::text[], $5::vector[])
ON CONFLICT DO NOTHING
"""

TRIM_POINTS = """
DELETE FROM anomaly_points WHERE namespace = $1 AND model = $2 AND position < $3
"""


@dataclass
class State:
    scored: int
    normal: int
    centroid_sum: np.ndarray  # float64 (dimension,)
    hist: np.ndarray  # float64 (HIST_BINS,)

    @classmethod
    def empty(cls, dimension: int) -> State:
        return cls(0, 0, np.zeros(dimension), np.zeros(scoring.HIST_BINS))


@dataclass
class Delta:
    """What one batch adds to the namespace's state, applied in the write transaction."""

    namespace: str
    start: int  # the position of the batch's first event
    state: State
    ids: list[str] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)


async def load_state(conn: Conn, namespace: str, model: str, dimension: int) -> State:
    row = await conn.fetchrow(LOAD_STATE, namespace, model)
    if row is None:
        return State.empty(dimension)
    return State(
        int(row["scored"]),
        int(row["normal"]),
        np.asarray(row["centroid_sum"], dtype=np.float64),
        np.asarray(row["score_hist"], dtype=np.float64),
    )


async def nearest_past(
    conn: Conn, namespace: str, model: str, vectors: np.ndarray, bounds: Sequence[int], k: int
) -> list[list[tuple[str, float]]]:
    """Per vector, its k nearest stored points with a position below its bound."""
    rows = await conn.fetch(
        NEAREST_PAST, [Vector(v) for v in vectors], list(bounds), namespace, model, k
    )
    out: list[list[tuple[str, float]]] = [[] for _ in range(len(vectors))]
    for r in rows:
        out[r["i"] - 1].append((r["id"], float(r["similarity"])))
    return out


async def score(
    conn: Conn, spec: Anomaly, namespace: str, model: str, changes: Sequence[Change]
) -> tuple[list[AnomalyResult], Delta]:
    """Score ``changes`` (one namespace, stream order) against the committed state."""
    vectors = scoring.normalise(np.vstack([c.vector for c in changes if c.vector is not None]))
    dimension = vectors.shape[1]
    state = await load_state(conn, namespace, model, dimension)
    start = state.scored
    positions = [start + i for i in range(len(changes))]
    bounds = [p - spec.horizon for p in positions]
    stored = await nearest_past(conn, namespace, model, vectors, bounds, spec.neighbours)
    delta = Delta(namespace, start, State.empty(dimension))
    centroid_sum = state.centroid_sum.copy()
    normal, hist = state.normal, state.hist.copy()
    results: list[AnomalyResult] = []
    for i, change in enumerate(changes):
        v = vectors[i]
        # Earlier events of this batch are history too, once they are past the horizon.
        local = [
            (changes[j].id, float(vectors[j] @ v)) for j in range(i) if positions[j] < bounds[i]
        ]
        hits = sorted([*stored[i], *local], key=lambda h: -h[1])[: spec.neighbours]
        centroid_d = centroid_distance(centroid_sum, normal, v)
        neighbour_d = 1.0 - float(np.mean([s for _, s in hits])) if hits else centroid_d
        value = neighbour_d
        seen = positions[i]
        threshold = scoring.quantile(hist, spec.quantile) if seen >= spec.warm_up else None
        alert = threshold is not None and value > threshold
        results.append(
            build(change, model, value, threshold, alert, seen, spec, centroid_d, neighbour_d, hits)
        )
        if not alert:
            centroid_sum += v
            normal += 1
            delta.state.centroid_sum += v
            delta.state.normal += 1
        bin_counts = scoring.histogram([value])
        hist += bin_counts
        delta.state.hist += bin_counts
        delta.state.scored += 1
        delta.ids.append(change.id)
        delta.vectors.append(v)
    return results, delta


def centroid_distance(centroid_sum: np.ndarray, count: int, vector: np.ndarray) -> float:
    """1 - cosine similarity to the mean of the normal vectors so far (1.0 with none)."""
    norm = float(np.linalg.norm(centroid_sum))
    if count == 0 or norm == 0:
        return 1.0
    return 1.0 - float(centroid_sum @ vector) / norm


async def apply(conn: Conn, model: str, delta: Delta, retain: int) -> None:
    """Add a batch's state and points; keep the last ``retain`` points of the namespace."""
    s = delta.state
    await conn.execute(
        ADD_STATE,
        delta.namespace,
        model,
        s.scored,
        s.normal,
        s.centroid_sum.tolist(),
        s.hist.tolist(),
    )
    positions = list(range(delta.start, delta.start + len(delta.ids)))
    await conn.execute(
        ADD_POINTS,
        delta.namespace,
        model,
        positions,
        delta.ids,
        [Vector(v) for v in delta.vectors],
    )
    end = delta.start + len(delta.ids)
    if end > retain:
        await conn.execute(TRIM_POINTS, delta.namespace, model, end - retain)


def build(
    change: Change,
    model: str,
    value: float,
    threshold: float | None,
    alert: bool,
    seen: int,
    spec: Anomaly,
    centroid_d: float,
    neighbour_d: float,
    hits: Sequence[tuple[str, float]],
) -> AnomalyResult:
    return AnomalyResult(
        key=result_key(change, model),
        namespace=change.namespace,
        id=change.id,
        content_hash=change.content_hash.hex(),
        model=model,
        source=SourcePosition(topic=change.topic, partition=change.partition, offset=change.offset),
        event_time=None if change.event_time == NO_TIME else change.event_time,
        anomaly=alert,
        score=round(value, 6),
        threshold=None if threshold is None else round(threshold, 6),
        warm_up=seen < spec.warm_up,
        method=METHOD,
        centroid_distance=round(centroid_d, 6),
        neighbour_distance=round(neighbour_d, 6),
        neighbours=[Neighbour(id=i, similarity=round(s, 6)) for i, s in hits],
        seen=seen,
    )
