"""Recommendation on the read side: the rows nearest a history's mean vector, or a user's
profile (kept from the interactions topic by ``worker.side.interactions``), through search's own
path (``worker.read.search.nearest``: the same distance, filters and index), without what the
history or the user has seen."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import asyncpg
import numpy as np

from worker.read.search import Hit, UnknownId, nearest
from worker.side.profiles import unit


class NoDirection(ValueError):
    """The vectors cancel out (their mean is zero): there is nothing to search for."""


async def by_history(
    conn: asyncpg.Connection,
    ids: Sequence[str],
    namespace: str,
    model: str,
    k: int = 5,
    metadata: dict[str, Any] | None = None,
) -> list[Hit]:
    """The k rows of ``namespace`` and ``model`` nearest the mean of the unit vectors of the
    stored rows ``ids`` (each counted once; a chunked document by its first chunk, as the
    analysis sees it), leaving those rows out. ``UnknownId`` names the
    ids with no stored row of this model."""
    wanted = list(dict.fromkeys(ids))
    rows = await conn.fetch(
        "SELECT id, embedding FROM embeddings WHERE namespace = $1 AND model = $2 "
        "AND id = ANY($3::text[]) AND chunk = 0",
        namespace,
        model,
        wanted,
    )
    found = {r["id"]: r["embedding"].to_numpy() for r in rows}
    missing = [i for i in wanted if i not in found]
    if missing:
        raise UnknownId(
            f"no stored row of model {model!r} in namespace {namespace!r} with id "
            + ", ".join(repr(i) for i in missing)
        )
    vectors = [v for v in (unit(found[i]) for i in wanted) if v is not None]
    if not vectors:
        raise NoDirection("every vector of the history is zero")
    query = unit(np.mean(vectors, axis=0))
    if query is None:
        raise NoDirection("the history's vectors cancel out: their mean is zero")
    return await excluding(conn, query, model, k, namespace, metadata, set(wanted))


async def by_user(
    conn: asyncpg.Connection,
    user: str,
    namespace: str,
    model: str,
    k: int = 5,
    metadata: dict[str, Any] | None = None,
) -> list[Hit]:
    """The k rows of ``namespace`` and ``model`` nearest the user's profile, leaving out the
    items the user interacted with (the latest ``recommend.seen_max``). ``UnknownId`` when
    the user has no profile."""
    profile = await conn.fetchrow(
        "SELECT mean FROM profiles WHERE namespace = $1 AND model = $2 AND user_id = $3",
        namespace,
        model,
        user,
    )
    if profile is None:
        raise UnknownId(
            f"no profile of user {user!r} in namespace {namespace!r} for model {model!r} "
            "(no interaction of theirs applied yet)"
        )
    query = unit(profile["mean"].to_numpy())
    if query is None:
        raise NoDirection(f"the profile of user {user!r} is a zero vector")
    seen = await conn.fetch(
        "SELECT item_id FROM profile_items WHERE namespace = $1 AND model = $2 AND user_id = $3",
        namespace,
        model,
        user,
    )
    return await excluding(conn, query, model, k, namespace, metadata, {r["item_id"] for r in seen})


async def excluding(
    conn: asyncpg.Connection,
    vector: np.ndarray,
    model: str,
    k: int,
    namespace: str,
    metadata: dict[str, Any] | None,
    exclude: Collection[str],
) -> list[Hit]:
    """Search's top k without the ids ``exclude``: k + len(exclude) are asked for, so
    the k left after dropping them are still the nearest."""
    hits = await nearest(conn, vector, model, k + len(exclude), namespace, metadata)
    return [h for h in hits if h.id not in exclude][:k]
