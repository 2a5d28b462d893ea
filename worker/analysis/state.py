"""What analysis remembers per namespace, in Postgres, and how a batch adds to it.

Every figure is a sum (events seen, vector sums, histogram counts), so an
update is an addition: replicas that analyse the same namespace add to the same rows, and
the additions happen in the transaction that stores the batch's offsets, so a crash or a
replay never counts an event twice. Past events (``analysis_points``) are kept by position
in the namespace for the k-NN anomaly distance, trimmed to ``history``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pgvector import Vector

from worker.analysis import scoring
from worker.sinks.postgres import Conn

LOAD_STATE = """
SELECT seen, vector_sum, score_hist FROM analysis_state WHERE namespace = $1 AND model = $2
"""

# Element-wise addition of two float8[] of the same length.
_ADD = "(SELECT array_agg(a + b ORDER BY i) FROM unnest({0}, {1}) WITH ORDINALITY u(a, b, i))"
# The same, the first faded by $6 (the score histogram's forgetting, see anomaly.py).
_FADE_ADD = _ADD.replace("a + b", "a * $6::float8 + b")

ADD_STATE = f"""
INSERT INTO analysis_state AS s (namespace, model, seen, vector_sum, score_hist)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (namespace, model) DO UPDATE SET
    seen = s.seen + EXCLUDED.seen,
    vector_sum = {_ADD.format("s.vector_sum", "EXCLUDED.vector_sum")},
    score_hist = {_FADE_ADD.format("s.score_hist", "EXCLUDED.score_hist")},
    updated_at = now()
"""

ADD_POINTS = """
INSERT INTO analysis_points (namespace, model, position, id, embedding)
SELECT $1, $2, * FROM unnest($3::bigint[], $4::text[], $5::vector[])
ON CONFLICT DO NOTHING
"""

TRIM_POINTS = """
DELETE FROM analysis_points WHERE namespace = $1 AND model = $2 AND position < $3
"""

POINTS_BETWEEN = """
SELECT position, embedding FROM analysis_points
WHERE namespace = $1 AND model = $2 AND position >= $3 AND position < $4
ORDER BY position
"""


@dataclass
class NamespaceState:
    seen: int
    vector_sum: np.ndarray  # float64 (dimension,): sum of every unit vector seen
    hist: np.ndarray  # float64 (HIST_BINS,): anomaly scores counted after the warm-up


@dataclass
class Delta:
    """A batch's additions, applied by the transaction that stores its offsets."""

    namespace: str
    start: int  # the namespace position of the batch's first event
    vector_sum: np.ndarray
    hist: np.ndarray
    # Scores counted: the stored histogram fades by the forgetting factor this many times.
    decays: int = 0
    ids: list[str] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def empty(cls, namespace: str, start: int, dimension: int) -> Delta:
        return cls(namespace, start, np.zeros(dimension), np.zeros(scoring.HIST_BINS))


async def load(conn: Conn, namespace: str, model: str, dimension: int) -> NamespaceState:
    row = await conn.fetchrow(LOAD_STATE, namespace, model)
    state = (
        NamespaceState(0, np.zeros(dimension), np.zeros(scoring.HIST_BINS))
        if row is None
        else NamespaceState(
            int(row["seen"]),
            np.asarray(row["vector_sum"], dtype=np.float64),
            np.asarray(row["score_hist"], dtype=np.float64),
        )
    )
    return state


async def points_between(
    conn: Conn, namespace: str, model: str, start: int, end: int
) -> list[tuple[int, np.ndarray]]:
    """Stored events with ``start <= position < end``, in order."""
    if end <= start:
        return []
    rows = await conn.fetch(POINTS_BETWEEN, namespace, model, start, end)
    return [(int(r["position"]), r["embedding"].to_numpy()) for r in rows]


async def apply(
    conn: Conn, model: str, delta: Delta, history: int, forgetting: float = 1.0
) -> None:
    ns = delta.namespace
    count = len(delta.ids)
    fade = forgetting**delta.decays
    await conn.execute(
        ADD_STATE, ns, model, count, delta.vector_sum.tolist(), delta.hist.tolist(), fade
    )
    await conn.execute(
        ADD_POINTS,
        ns,
        model,
        list(range(delta.start, delta.start + count)),
        delta.ids,
        [Vector(v) for v in delta.vectors],
    )
    end = delta.start + count
    if end > history:
        await conn.execute(TRIM_POINTS, ns, model, end - history)
