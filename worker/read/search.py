"""The read side over whatever the worker stored: search (dense: embed the query, rank by
cosine distance; sparse: by the inner product of the sparse vectors, for a provider with
output_type dense&sparse; lexical: Postgres full-text search over the stored content; hybrid:
dense and sparse, or dense and lexical without sparse vectors, fused by reciprocal rank),
similar (a stored row's own vector is the query) and cluster (k-means, streamed).
Every mode returns documents: a chunked document (oversize_policy = chunk) by its best
chunk, whose text is the hit's content. docs/retrieval.md has the equivalent SQL and the
measured quality."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import asyncpg
import numpy as np
from pgvector import SparseVector

from worker.embedding.providers.base import Embedder
from worker.events import TextType
from worker.read import index
from worker.read.kmeans import ClusterSummary, Reservoir, Summarizer, spherical_kmeans
from worker.sinks.postgres import SchemaError


@dataclass(frozen=True)
class Hit:
    namespace: str
    id: str
    # dense: cosine similarity; sparse: inner product; lexical: ts_rank (length-normalised);
    # hybrid: the fused sum
    score: float
    content: str | None  # a chunked document: its best chunk's text
    metadata: dict[str, Any]
    chunk: int = 0  # which chunk of the document matched best (0 when not chunked)


class Mode(StrEnum):
    DENSE = "dense"
    SPARSE = "sparse"
    LEXICAL = "lexical"
    HYBRID = "hybrid"


# Defaults of search.rrf_k and search.candidates (worker/config.py: SearchSettings).
RRF_K = 60
CANDIDATES = 100


async def search(
    conn: asyncpg.Connection,
    embedder: Embedder | None,
    query: str,
    k: int = 5,
    namespace: str | None = None,
    metadata: dict[str, Any] | None = None,
    mode: Mode = Mode.DENSE,
    *,
    model: str | None = None,
    rrf_k: int = RRF_K,
    candidates: int = CANDIDATES,
) -> list[Hit]:
    """The top-k stored rows for `query` in one of four modes, each within `namespace` and
    the metadata subset `metadata` (jsonb containment), over the rows of one model (the
    embedder's, else `model`; None in lexical mode: every row).

    dense: nearest by cosine distance (needs `embedder`). sparse: rows sharing a token with
    the query's sparse vector, by inner product (needs an embedder that returns sparse
    vectors: provider.output_type dense&sparse; ValueError otherwise). lexical: rows holding
    any of the query's words under the table's text search configuration, by ts_rank; a
    query with no words to match (empty, punctuation, only stop words) finds nothing.
    hybrid: the `candidates` best of dense and of sparse when the embedder returns sparse
    vectors, else of dense and of lexical (at least k of each), fused by ``rrf``; with
    nothing to match on the second side it is the dense list (re-scored)."""
    if embedder is not None:
        model = embedder.model
    if mode is Mode.LEXICAL:
        return await lexical(conn, query, k, namespace, metadata, model)
    if embedder is None:
        raise ValueError(f"{mode.value} search needs an embedder")
    embedded = await embedder.embed([query], TextType.QUERY)
    vector = embedded.vectors[0]
    if mode is Mode.DENSE:
        return await nearest(conn, vector, embedder.model, k, namespace, metadata)
    if mode is Mode.SPARSE:
        if embedded.sparse is None:
            raise ValueError(
                "sparse search needs sparse vectors: provider.output_type = 'dense&sparse' "
                "(DashScope's native API)"
            )
        return await sparse(conn, embedded.sparse[0], embedder.model, k, namespace, metadata)
    depth = max(candidates, k)
    dense = await nearest(conn, vector, embedder.model, depth, namespace, metadata)
    if embedded.sparse is not None:
        tokens = await sparse(conn, embedded.sparse[0], embedder.model, depth, namespace, metadata)
        return rrf([dense, tokens], rrf_k, k)
    words = await lexical(conn, query, depth, namespace, metadata, model)
    return rrf([dense, words], rrf_k, k)


# More rows are asked for, this many times as many each round, while chunks of the same
# documents fill the k.
WIDEN = 4


async def per_document(
    fetch: Callable[[int], Awaitable[list[asyncpg.Record]]], k: int
) -> list[Hit]:
    """The best row of each document among rows ranked best first (``fetch(limit)``): k
    rows are asked for, and more only while several chunks of one document leave fewer
    than k documents (so a table without chunked documents runs each query once, as
    before)."""
    limit = k
    while True:
        rows = await fetch(limit)
        hits: dict[tuple[str, str], Hit] = {}
        for r in rows:
            key = (r["namespace"], r["id"])
            if key not in hits:
                hits[key] = Hit(
                    r["namespace"],
                    r["id"],
                    float(r["score"]),
                    r["content"],
                    json.loads(r["metadata"]),
                    r["chunk"],
                )
        if len(hits) >= k or len(rows) < limit:
            return list(hits.values())[:k]
        limit *= WIDEN


def rrf(lists: Sequence[Sequence[Hit]], k: int = RRF_K, limit: int | None = None) -> list[Hit]:
    """Reciprocal rank fusion (Cormack et al., 2009): each row scores the sum over the lists
    that hold it of 1 / (k + rank), ranks from 1; a large k flattens the head of each list.
    Ties keep the order of first appearance (the first list's first). The hits carry the
    fused score; a row's other fields come from the first list that holds it."""
    fused: dict[tuple[str, str], Hit] = {}
    scores: dict[tuple[str, str], float] = {}
    for hits in lists:
        for rank, hit in enumerate(hits, start=1):
            key = (hit.namespace, hit.id)
            fused.setdefault(key, hit)
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
    order = sorted(fused, key=lambda key: -scores[key])  # stable: ties keep first appearance
    return [replace(fused[key], score=scores[key]) for key in order[:limit]]


# Any of the query's words, by ts_rank normalised by the log of the row's length (normalisation
# 1: on AG News it found the known item far more often than ts_rank_cd, docs/retrieval.md).
# {words} is the stored column of `index create --lexical` if there is one (its GIN index
# answers `@@`), else the words computed per scanned row; the functions come from 0006.
LEXICAL = """
SELECT namespace, id, chunk, content, metadata, ts_rank({words}, q, 1) AS score
FROM embeddings, embeddings_lexical_query($1) AS q
WHERE numnode(q) > 0 AND {words} @@ q
  AND ($2::text IS NULL OR model = $2)
  AND ($3::text IS NULL OR namespace = $3)
  AND ($4::jsonb IS NULL OR metadata @> $4::jsonb)
ORDER BY score DESC, namespace, id, chunk
LIMIT $5
"""


async def lexical_sql(conn: asyncpg.Connection) -> str:
    """The lexical statement for this table (with or without the stored words)."""
    stored = await index.has_lexical_column(conn)
    return LEXICAL.format(words=index.LEXICAL_COLUMN if stored else "embeddings_lexical(content)")


async def lexical(
    conn: asyncpg.Connection,
    query: str,
    k: int = 5,
    namespace: str | None = None,
    metadata: dict[str, Any] | None = None,
    model: str | None = None,
) -> list[Hit]:
    """Full-text search over the stored content (the stored words and their index if
    ``index create --lexical`` made them)."""
    sql = await lexical_sql(conn)
    where = None if metadata is None else json.dumps(metadata)
    async with conn.transaction():
        # Custom plans, as for dense search (index.search_order): a prepared statement's
        # generic plan for the optional filters runs without parallel workers (2.5x slower).
        await conn.execute("SELECT set_config('plan_cache_mode', 'force_custom_plan', true)")
        return await per_document(
            lambda limit: conn.fetch(sql, query, model, namespace, where, limit), k
        )


# The rows sharing a token with the query (inner product above 0), by inner product; `<#>` is
# its negative. Exact, ties by namespace and id; with the sparse HNSW index (`index create
# --sparse`) ordered by `sparse <#> $1` alone, which the index answers (index.sparse_order).
SPARSE = """
SELECT namespace, id, chunk, content, metadata, -(sparse <#> $1) AS score
FROM embeddings
WHERE model = $2 AND sparse IS NOT NULL AND (sparse <#> $1) < 0
  AND ($3::text IS NULL OR namespace = $3)
  AND ($4::jsonb IS NULL OR metadata @> $4::jsonb)
ORDER BY {order}
LIMIT $5
"""


async def sparse(
    conn: asyncpg.Connection,
    vector: SparseVector,
    model: str,
    k: int = 5,
    namespace: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> list[Hit]:
    """Top-k rows of this model by the inner product of their stored sparse vector with the
    query's (rows without one, or sharing no token with it, are never hits)."""
    where = None if metadata is None else json.dumps(metadata)

    async def fetch(limit: int) -> list[asyncpg.Record]:
        # Custom plans, as for the other modes (set by sparse_order): the generic plan of
        # the optional filters is a sequential scan even where an index would answer.
        order = await index.sparse_order(conn, limit)
        return await conn.fetch(SPARSE.format(order=order), vector, model, namespace, where, limit)

    async with conn.transaction():
        return await per_document(fetch, k)


async def text_config(conn: asyncpg.Connection) -> str:
    """The table's text search configuration; SchemaError before migration 0006."""
    if await conn.fetchval("SELECT to_regproc('embeddings_text_config')") is None:
        raise SchemaError(
            "lexical and hybrid search need migration 0006_lexical.sql: run "
            "`embedding-worker migrate`"
        )
    return str(await conn.fetchval("SELECT embeddings_text_config()::text"))


async def has_words(conn: asyncpg.Connection, query: str) -> bool:
    """Whether the query has anything lexical search can match (not empty, not only stop
    words or punctuation under the table's text search configuration)."""
    return bool(await conn.fetchval("SELECT numnode(embeddings_lexical_query($1)) > 0", query))


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
    query = np.asarray(vector, dtype=np.float32)
    where = None if metadata is None else json.dumps(metadata)

    async def fetch(limit: int) -> list[asyncpg.Record]:
        order = await index.search_order(conn, len(vector), limit)
        return await conn.fetch(
            "SELECT namespace, id, chunk, content, metadata, 1 - (embedding <=> $1) AS score "
            "FROM embeddings WHERE model = $2 "
            "AND ($3::text IS NULL OR namespace = $3) "
            "AND ($4::jsonb IS NULL OR metadata @> $4::jsonb) "
            "AND ($6::text IS NULL OR (namespace, id) <> ($6::text, $7::text)) "
            f"ORDER BY {order} LIMIT $5",
            query,
            model,
            namespace,
            where,
            limit,
            None if exclude is None else exclude[0],
            None if exclude is None else exclude[1],
        )

    async with conn.transaction():
        return await per_document(fetch, k)


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
        "SELECT embedding, model FROM embeddings WHERE namespace = $1 AND id = $2 AND chunk = 0",
        namespace,
        id,
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
    """Spherical k-means over the stored vectors of (namespace, model) (a chunked document
    by its first chunk), streamed by a cursor.

    Pass 1 reads every row in id order into a seeded reservoir of `sample` rows and fits the
    centroids on it. If the reservoir holds every row, it is also what gets summarised;
    otherwise pass 2 streams the rows again and assigns each to its nearest centroid, so sizes,
    cohesion and nearest members describe the whole namespace. Both passes run in one
    read-only repeatable-read transaction (one snapshot), and memory is bounded by the sample.
    """
    query = (
        "SELECT id, left(coalesce(content, ''), $3) AS snippet, embedding FROM embeddings "
        "WHERE namespace = $1 AND model = $2 AND chunk = 0 ORDER BY id"
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
