"""Classification of a namespace's batch, event by event in stream order.

For each event x (unit vector), per label c, the score adds up to three terms:
- zero-shot: ``description_weight * cos(x, L_c)``, L_c the mean of c's description vectors;
- prototype: ``cos(x - mu, P_c - n_c * mu)``, P_c the sum of c's n_c member vectors (its
  examples plus, with ``adapt``, every past event classified as c), mu the examples' mean
  (or the stream's running mean without examples); used once every label has
  ``min_members`` (examples alone always qualify when there are no descriptions);
- few-shot vote: ``vote_weight * log(p_c + 0.001)``, p the similarity-weighted vote of the k
  labeled vectors nearest x in pgvector (examples, and past events with the label they got).
The first two are divided by ``temperature``; the probabilities are the softmax of the sum.
With ``adapt`` the event then joins its label (self-training on the stream), so prototypes
follow the stream's own vocabulary. docs/analysis.md has the measurements behind this.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pgvector import Vector

from worker.analysis import scoring
from worker.analysis.labels import LabelSet
from worker.analysis.results import ClassificationResult, LabelScore, Method, origin
from worker.analysis.state import Delta, NamespaceState
from worker.decode import Change
from worker.store import Conn

VOTE_FLOOR = 1e-3

NEAREST_LABELED = """
SELECT q.i, n.label, n.similarity
FROM unnest($1::vector[]) WITH ORDINALITY AS q(v, i)
CROSS JOIN LATERAL (
    (SELECT label, 1 - (embedding <=> q.v) AS similarity FROM label_vectors
     WHERE namespace = $2 AND model = $3 AND kind IN ('example', 'decision')
     ORDER BY embedding <=> q.v LIMIT $4)
    UNION ALL
    (SELECT label, 1 - (embedding <=> q.v) AS similarity FROM analysis_points
     WHERE namespace = $2 AND model = $3 AND label IS NOT NULL
     ORDER BY embedding <=> q.v LIMIT $4)
) n
"""


async def nearest_labeled(
    conn: Conn, labels: LabelSet, model: str, vectors: np.ndarray
) -> list[list[tuple[int, float]]]:
    """Per vector, its nearest labeled vectors as (label index, cosine similarity)."""
    index = {name: i for i, name in enumerate(labels.names)}
    rows = await conn.fetch(
        NEAREST_LABELED,
        [Vector(v) for v in vectors],
        labels.namespace,
        model,
        labels.spec.neighbours,
    )
    out: list[list[tuple[int, float]]] = [[] for _ in range(len(vectors))]
    for r in rows:
        if r["label"] in index:  # a label removed from the file is ignored
            out[r["i"] - 1].append((index[r["label"]], float(r["similarity"])))
    return out


@dataclass
class Classified:
    probabilities: np.ndarray  # (labels,)
    label: int


def method_of(labels: LabelSet) -> Method:
    if labels.prototypes is None:
        return "few-shot"
    return "zero-shot+few-shot" if labels.examples else "zero-shot"


def classify_batch(
    labels: LabelSet,
    state: NamespaceState,
    vectors: np.ndarray,
    stored: Sequence[Sequence[tuple[int, float]]] | None,
    delta: Delta,
) -> list[Classified]:
    """Classify ``vectors`` (unit, stream order) and record the adaptation in ``delta``."""
    spec, names = labels.spec, labels.names
    n_labels = len(names)
    members = labels.example_counts.astype(np.float64) + [state.members[n] for n in names]
    sums = labels.example_sums + np.vstack(
        [state.label_sums.get(n, np.zeros(vectors.shape[1])) for n in names]
    )
    stream_sum, seen = state.vector_sum.copy(), state.seen
    fixed_centre = labels.example_mean
    use_vote = stored is not None and labels.examples > 0 and spec.neighbours > 0
    out: list[Classified] = []
    for i, x in enumerate(vectors):
        stream_sum += x
        seen += 1
        z = np.zeros(n_labels)
        if labels.prototypes is not None:
            z += spec.description_weight * (labels.prototypes @ x)
        enough = members.min() >= (1 if labels.prototypes is None else spec.min_members)
        if enough:
            mu = fixed_centre if fixed_centre is not None else stream_sum / seen
            z += cosines(x - mu, sums - members[:, None] * mu)
        z /= spec.temperature
        if use_vote and stored is not None:
            hits = list(stored[i])
            if spec.adapt:  # earlier events of this batch are labeled history too
                sims = vectors[:i] @ x
                hits += [(out[j].label, float(sims[j])) for j in range(i)]
            hits = sorted(hits, key=lambda h: -h[1])[: spec.neighbours]
            if hits:
                vote = scoring.knn_vote([hits], n_labels, spec.vote_temperature)[0]
                z += spec.vote_weight * np.log(vote + VOTE_FLOOR)
        probs = scoring.softmax(z, 1.0)
        best = int(np.argmax(probs))
        out.append(Classified(probs, best))
        if spec.adapt:
            members[best] += 1
            sums[best] += x
            delta.members[names[best]] += 1
            delta.label_sums.setdefault(names[best], np.zeros(len(x)))
            delta.label_sums[names[best]] += x
    return out


def cosines(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1) * float(np.linalg.norm(x))
    out: np.ndarray = np.divide(rows @ x, norms, out=np.zeros(len(rows)), where=norms > 0)
    return out


def build(
    labels: LabelSet, model: str, change: Change, classified: Classified
) -> ClassificationResult:
    spec = labels.spec
    probs = classified.probabilities
    ranked = scoring.top_k(probs, labels.names, spec.top_k)
    out_of_scope = round(1.0 - float(probs.max()), 6)
    action, rule = scoring.moderate(
        {name: float(p) for name, p in zip(labels.names, probs, strict=True)},
        spec.policy,
        out_of_scope,
    )
    return ClassificationResult(
        **origin(change, model),
        label=labels.names[classified.label],
        labels=[LabelScore(label=n, score=round(s, 6)) for n, s in ranked],
        method=method_of(labels),
        out_of_scope=out_of_scope,
        action=action,
        rule=None if rule is None else f"{rule.label}>={rule.min_score}",
    )
