"""Zero-shot and few-shot classification of a batch, and the moderation action.

Zero-shot compares each event with the label vectors in memory; few-shot asks pgvector for
the labeled examples nearest to each event (one query for the whole batch) and lets them
vote. With both available the two distributions are mixed by ``few_shot_weight``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pgvector import Vector

from worker.analysis import scoring
from worker.analysis.labels import LabelSet
from worker.analysis.results import ClassificationResult, LabelScore, Method, result_key
from worker.decode import NO_TIME, Change
from worker.events import SourcePosition
from worker.store import Conn

NEAREST_EXAMPLES = """
SELECT q.i, l.label, 1 - (l.embedding <=> q.v) AS similarity
FROM unnest($1::vector[]) WITH ORDINALITY AS q(v, i)
CROSS JOIN LATERAL (
    SELECT label, embedding FROM label_vectors
    WHERE namespace = $2 AND model = $3 AND kind = 'example'
    ORDER BY embedding <=> q.v LIMIT $4
) l
"""


async def nearest_examples(
    conn: Conn, labels: LabelSet, model: str, vectors: np.ndarray
) -> list[list[tuple[int, float]]]:
    """Per vector, its nearest examples as (label index, cosine similarity)."""
    index = {name: i for i, name in enumerate(labels.names)}
    rows = await conn.fetch(
        NEAREST_EXAMPLES,
        [Vector(v) for v in vectors],
        labels.namespace,
        model,
        labels.spec.neighbours,
    )
    out: list[list[tuple[int, float]]] = [[] for _ in range(len(vectors))]
    for r in rows:
        if r["label"] in index:
            out[r["i"] - 1].append((index[r["label"]], float(r["similarity"])))
    return out


def probabilities(
    labels: LabelSet, vectors: np.ndarray, neighbours: Sequence[Sequence[tuple[int, float]]] | None
) -> tuple[np.ndarray, Method]:
    """(n, labels) probabilities and the method that produced them."""
    spec = labels.spec
    zero = (
        None
        if labels.prototypes is None
        else scoring.zero_shot(vectors, labels.prototypes, spec.temperature)
    )
    few = (
        None
        if neighbours is None
        else scoring.knn_vote(neighbours, len(labels.names), spec.temperature)
    )
    method: Method = "zero-shot+few-shot"
    if few is None:
        method = "zero-shot"
    elif zero is None:
        method = "few-shot"
    return scoring.combine(zero, few, spec.few_shot_weight), method


async def classify(
    conn: Conn, labels: LabelSet, model: str, changes: Sequence[Change]
) -> list[ClassificationResult]:
    vectors = np.vstack([c.vector for c in changes if c.vector is not None])
    neighbours = await nearest_examples(conn, labels, model, vectors) if labels.examples else None
    probs, method = probabilities(labels, vectors, neighbours)
    return [build(labels, model, c, p, method) for c, p in zip(changes, probs, strict=True)]


def build(
    labels: LabelSet, model: str, change: Change, probs: np.ndarray, method: Method
) -> ClassificationResult:
    spec = labels.spec
    ranked = scoring.top_k(probs, labels.names, spec.top_k)
    action, rule = scoring.moderate(
        {name: float(p) for name, p in zip(labels.names, probs, strict=True)}, spec.policy
    )
    return ClassificationResult(
        key=result_key(change, model),
        namespace=change.namespace,
        id=change.id,
        content_hash=change.content_hash.hex(),
        model=model,
        source=SourcePosition(topic=change.topic, partition=change.partition, offset=change.offset),
        event_time=None if change.event_time == NO_TIME else change.event_time,
        label=ranked[0][0],
        labels=[LabelScore(label=n, score=round(s, 6)) for n, s in ranked],
        method=method,
        action=action,
        rule=None if rule is None else f"{rule.label}>={rule.min_score}",
    )
