"""The read side over whatever the worker stored: search (embed the query, rank by cosine
distance), similar (a stored row's own vector is the query) and cluster (k-means, streamed)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import asyncpg
import numpy as np

from worker import index
from worker.cluster import ClusterSummary, Reservoir, Summarizer, spherical_kmeans
from worker.embedders.base import Embedder
from worker.events import TextType


@dataclass(frozen=True)
class Hit:
    namespace: str
    id: str
    score: float  # cosine similarity
    content: str | None
    metadata: dict[str, Any]


async def search(
    conn: asyncpg.Connection,
    embedder: Embedder,
    query: str,
    k: int = 5,
    namespace: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> list[Hit]:
    vector = (await embedder.embed([query], TextType.QUERY)).vectors[0]
    return await nearest(conn, vector, embedder.model, k, namespace, metadata)


async def nearest(
    conn: asyncpg.Connection,
    vector: np.ndarray,
    model: str,
    k: int = 5,
    namespace: str | None = None,
    metadata: dict[str, Any] | None = None,
    exclude: tuple[str, str] | None = None,
) -> list[Hit]:
    """Top-k rows of this model, optionally within a namespace and a metadata subset,
    leaving out the row `exclude` = (namespace, id). Exact without an HNSW index, through
    it (approximate) with one (``embedding-worker index``)."""
    async with conn.transaction():
        order = await index.search_order(conn, len(vector), k)
        rows = await conn.fetch(
            "SELECT namespace, id, content, metadata, 1 - (embedding <=> $1) AS score "
            "FROM embeddings WHERE model = $2 "
            "AND ($3::text IS NULL OR namespace = $3) "
            "AND ($4::jsonb IS NULL OR metadata @> $4::jsonb) "
            "AND ($6::text IS NULL OR (namespace, id) <> ($6::text, $7::text)) "
            f"ORDER BY {order} LIMIT $5",
            np.asarray(vector, dtype=np.float32),
            model,
            namespace,
            None if metadata is None else json.dumps(metadata),
            k,
            None if exclude is None else exclude[0],
            None if exclude is None else exclude[1],
        )
    return [
        Hit(r["namespace"], r["id"], float(r["score"]), r["content"], json.loads(r["metadata"]))
        for r in rows
    ]


class UnknownId(LookupError):
    """No stored row has this (namespace, id)."""


async def similar(
    conn: asyncpg.Connection,
    id: str,
    namespace: str,
    k: int = 5,
    metadata: dict[str, Any] | None = None,
) -> list[Hit]:
    """Recommendation: the k rows of the same namespace and model nearest the stored vector of
    (namespace, id), without that row itself."""
    row = await conn.fetchrow(
        "SELECT embedding, model FROM embeddings WHERE namespace = $1 AND id = $2", namespace, id
    )
    if row is None:
        raise UnknownId(f"no stored row with id {id!r} in namespace {namespace!r}")
    return await nearest(
        conn,
        row["embedding"].to_numpy(),
        row["model"],
        k,
        namespace,
        metadata,
        exclude=(namespace, id),
    )


@dataclass(frozen=True)
class Clustering:
    namespace: str
    model: str
    rows: int  # rows of this namespace and model, all assigned to a cluster
    fitted_on: int  # rows the centroids were fitted on (the sample)
    clusters: list[ClusterSummary]


# Enough of each row's text for a summary line; the full text never sits in memory.
SNIPPET_CHARS = 200


async def cluster(
    conn: asyncpg.Connection,
    namespace: str,
    model: str,
    k: int = 8,
    sample: int = 10_000,
    seed: int = 0,
    members: int = 3,
    chunk: int = 1_000,
) -> Clustering:
    """Spherical k-means over the stored vectors of (namespace, model), streamed by a cursor.

    Pass 1 reads every row in id order into a seeded reservoir of `sample` rows and fits the
    centroids on it. If the reservoir holds every row, it is also what gets summarised;
    otherwise pass 2 streams the rows again and assigns each to its nearest centroid, so sizes,
    cohesion and nearest members describe the whole namespace. Both passes run in one
    read-only repeatable-read transaction (one snapshot), and memory is bounded by the sample.
    """
    query = (
        "SELECT id, left(coalesce(content, ''), $3) AS snippet, embedding FROM embeddings "
        "WHERE namespace = $1 AND model = $2 ORDER BY id"
    )
    args = (namespace, model, SNIPPET_CHARS)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        reservoir = Reservoir(sample, seed)
        dimension = 0
        async for r in conn.cursor(query, *args, prefetch=chunk):
            id, snippet, vector = _row(r)
            dimension = len(vector)
            reservoir.offer(id, snippet, vector)
        fitted = spherical_kmeans(reservoir.matrix(dimension), k, seed)
        summary = Summarizer(fitted.centroids, members)
        if reservoir.complete:
            for start in range(0, len(reservoir.items), chunk):
                _summarise(summary, reservoir.items[start : start + chunk])
        else:
            batch: list[tuple[str, str, np.ndarray]] = []
            async for r in conn.cursor(query, *args, prefetch=chunk):
                batch.append(_row(r))
                if len(batch) == chunk:
                    _summarise(summary, batch)
                    batch = []
            _summarise(summary, batch)
    return Clustering(namespace, model, reservoir.seen, len(reservoir.items), summary.summaries())


def _row(r: asyncpg.Record) -> tuple[str, str, np.ndarray]:
    return r["id"], r["snippet"], np.asarray(r["embedding"].to_numpy(), dtype=np.float32)


def _summarise(summary: Summarizer, rows: list[tuple[str, str, np.ndarray]]) -> None:
    if rows:
        summary.add([r[0] for r in rows], [r[1] for r in rows], np.stack([r[2] for r in rows]))
