"""Semantic search over whatever the worker stored: embed the query, rank by cosine distance."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import asyncpg
import numpy as np

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
) -> list[Hit]:
    """Top-k rows of this model, optionally within a namespace and a metadata subset."""
    rows = await conn.fetch(
        "SELECT namespace, id, content, metadata, 1 - (embedding <=> $1) AS score "
        "FROM embeddings WHERE model = $2 "
        "AND ($3::text IS NULL OR namespace = $3) "
        "AND ($4::jsonb IS NULL OR metadata @> $4::jsonb) "
        "ORDER BY embedding <=> $1 LIMIT $5",
        np.asarray(vector, dtype=np.float32),
        model,
        namespace,
        None if metadata is None else json.dumps(metadata),
        k,
    )
    return [
        Hit(r["namespace"], r["id"], float(r["score"]), r["content"], json.loads(r["metadata"]))
        for r in rows
    ]
