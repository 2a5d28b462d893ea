"""Postgres/pgvector: one transaction per flush stores the rows and the consumer offsets.

Versions are ``(event_time, source_offset)``: an event whose version is not newer than the
stored row (or the stored tombstone) changes nothing, so replays are no-ops and an older
event arriving late never overwrites a newer one.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import asyncpg
import numpy as np
from asyncpg.pool import PoolConnectionProxy
from pgvector import Vector

from worker.config import ConfigError
from worker.model import Change
from worker.sinks.vectors import register_vector

# A plain connection or one borrowed from a pool.
Conn = asyncpg.Connection | PoolConnectionProxy

UPSERT_COLUMNS = (
    "namespace",
    "id",
    "embedding",
    "content",
    "content_hash",
    "text_type",
    "metadata",
    "truncated",
    "source_topic",
    "source_partition",
    "source_offset",
    "event_time",
    "sparse",
    "chunk",
    "media",
)

# Rows and offsets in one statement, so in one round trip, and in its own transaction when
# nothing else has to join it. The rows arrive as arrays and take the version guards: a
# newer tombstone keeps a row out, and an older event never overwrites a newer row. (Under
# load the writer's time went to round trips, each waiting for a busy event loop.)
UPSERT_AND_STORE_OFFSETS = f"""
WITH s AS (
    SELECT * FROM unnest($3::text[], $4::text[], $5::vector[], $6::text[], $7::bytea[],
        $8::text[], $9::jsonb[], $10::bool[], $11::text[], $12::int[], $13::bigint[],
        $14::timestamptz[], $19::sparsevec[], $20::int[], $21::jsonb[])
    AS s({", ".join(UPSERT_COLUMNS)})
), upserted AS (
    INSERT INTO embeddings AS t (namespace, id, embedding, content, content_hash, text_type,
        model, dimension, metadata, truncated, source_topic, source_partition, source_offset,
        event_time, sparse, chunk, media)
    SELECT s.namespace, s.id, s.embedding, s.content, s.content_hash, s.text_type, $1, $2,
        s.metadata, s.truncated, s.source_topic, s.source_partition, s.source_offset,
        s.event_time, s.sparse, s.chunk, s.media
    FROM s
    WHERE NOT EXISTS (
        SELECT 1 FROM embedding_tombstones d
        WHERE d.namespace = s.namespace AND d.id = s.id
          AND (d.event_time, d.source_offset) >= (s.event_time, s.source_offset))
    ON CONFLICT (namespace, id, chunk) DO UPDATE SET
        embedding = EXCLUDED.embedding, content = EXCLUDED.content,
        content_hash = EXCLUDED.content_hash, text_type = EXCLUDED.text_type,
        model = EXCLUDED.model, dimension = EXCLUDED.dimension, metadata = EXCLUDED.metadata,
        truncated = EXCLUDED.truncated, source_topic = EXCLUDED.source_topic,
        source_partition = EXCLUDED.source_partition, source_offset = EXCLUDED.source_offset,
        event_time = EXCLUDED.event_time, sparse = EXCLUDED.sparse, media = EXCLUDED.media,
        version = t.version + 1,
        updated_at = now()
    WHERE (t.event_time, t.source_offset) < (EXCLUDED.event_time, EXCLUDED.source_offset)
    RETURNING 1
), stale AS (
    -- A document's rows past its new last chunk (it shrank, or is no longer chunked) that
    -- are older than the new version go in the same statement as its new chunks: never a
    -- mix of old and new chunks. An older event (a replay) removes nothing.
    DELETE FROM embeddings AS t
    USING (SELECT namespace, id, max(chunk) AS last, event_time, source_offset FROM s
           GROUP BY namespace, id, event_time, source_offset) AS d
    WHERE t.namespace = d.namespace AND t.id = d.id AND t.chunk > d.last
      AND (t.event_time, t.source_offset) < (d.event_time, d.source_offset)
), stored AS (
    -- GREATEST: a worker that lost its partition in a rebalance never moves one back.
    INSERT INTO consumer_offsets AS o (group_id, topic, partition, next_offset)
    SELECT $15, * FROM unnest($16::text[], $17::int[], $18::bigint[])
    ON CONFLICT (group_id, topic, partition) DO UPDATE SET
        next_offset = GREATEST(o.next_offset, EXCLUDED.next_offset), updated_at = now()
)
SELECT count(*) FROM upserted
"""

# From this many rows to embed on, a write first copies the new keys straight into the
# table (binary COPY, no guard: there is nothing to guard against), in an explicit
# transaction: more round trips, which a busy writer's bigger transactions amortise, and
# less work per row.
DIRECT_FROM_ROWS = 100

# Keys of a batch that already have a row or a tombstone (any version): those take the
# guarded upsert; the others are new and are copied straight into the table. $1 holds the
# batch's distinct namespaces and $2 its ids: the primary-key index answers both arrays at
# once, and a key found for another (namespace, id) pair of the batch is simply not used.
EXISTING = """
SELECT namespace, id FROM embeddings WHERE namespace = ANY($1::text[]) AND id = ANY($2::text[])
UNION ALL
SELECT namespace, id FROM embedding_tombstones
WHERE namespace = ANY($1::text[]) AND id = ANY($2::text[])
"""

DIRECT_COLUMNS = (*UPSERT_COLUMNS, "model", "dimension")

# After the direct COPY, in a new snapshot: did a delete of one of those keys commit since
# EXISTING looked? (Then the transaction is redone with every row guarded; as in EXISTING,
# a tombstone of another pair of the batch's namespaces and ids only costs a redo.)
TOMBSTONED_SINCE = """
SELECT EXISTS (SELECT 1 FROM embedding_tombstones
               WHERE namespace = ANY($1::text[]) AND id = ANY($2::text[]))
"""


class _Redo(Exception):
    """The direct path raced with another writer: redo the transaction fully guarded."""


# Same content already embedded: refresh everything but the vector (every chunk's row).
TOUCH = """
UPDATE embeddings AS t SET metadata = s.metadata, source_topic = s.source_topic,
    source_partition = s.source_partition, source_offset = s.source_offset,
    event_time = s.event_time, version = t.version + 1, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::text[], $5::int[], $6::bigint[],
            $7::timestamptz[], $8::bytea[])
     AS s(namespace, id, metadata, source_topic, source_partition, source_offset, event_time,
          content_hash)
WHERE t.namespace = s.namespace AND t.id = s.id AND t.content_hash = s.content_hash
  AND (t.event_time, t.source_offset) < (s.event_time, s.source_offset)
"""

TOMBSTONE = """
INSERT INTO embedding_tombstones AS d (namespace, id, event_time, source_offset)
SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::bigint[])
ON CONFLICT (namespace, id) DO UPDATE SET event_time = EXCLUDED.event_time,
    source_offset = EXCLUDED.source_offset, deleted_at = now()
WHERE (d.event_time, d.source_offset) < (EXCLUDED.event_time, EXCLUDED.source_offset)
"""

DELETE = """
DELETE FROM embeddings AS t
USING unnest($1::text[], $2::text[], $3::timestamptz[], $4::bigint[])
      AS s(namespace, id, event_time, source_offset)
WHERE t.namespace = s.namespace AND t.id = s.id
  AND (t.event_time, t.source_offset) < (s.event_time, s.source_offset)
"""

# Postgres is down, restarting or unreachable: wait and retry, never drop or dead-letter.
# Retrying a write is always safe: a repeated transaction is a no-op (strict version guards,
# GREATEST for offsets), even when the first attempt committed and only its reply was lost.
PG_UNAVAILABLE = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
    # Deadlock or serialization failure: the transaction rolled back and may simply be rerun.
    asyncpg.exceptions.TransactionRollbackError,
    # The client's state after a connection broke in the middle of an operation.
    asyncpg.exceptions.InternalClientError,
)


DSN_SETTING = "postgres.dsn (EMBEDDING_WORKER_POSTGRES__DSN)"


class Unreachable(Exception):
    """No usable answer to a connection attempt: an outage to wait out, not a configuration."""


class SchemaError(Exception):
    """The database is not ready for this configuration (a start-up error, not a data error)."""


@dataclass
class WriteResult:
    upserted: int = 0  # embedded rows inserted or updated (stale versions are not)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release, without asyncpg's reset query (a round trip per write).

    The worker leaves no session state on a pooled connection: its settings are transaction
    local (``set_config(..., true)``) and its locks transaction-scoped; an open transaction
    is rolled back by asyncpg before this is called.
    """


async def connect_unchecked(dsn: str) -> asyncpg.Connection:
    """A plain connection: for migrations and offsets, which need no vector codec."""
    async with connecting():
        return await asyncpg.connect(dsn)


async def connect(dsn: str, dimension: int) -> asyncpg.Connection:
    """One checked connection with the vector codec (for the command line)."""
    conn = await connect_unchecked(dsn)
    try:
        await check_schema(conn, dimension)
        await register_vector(conn)
    except BaseException:
        await conn.close()
        raise
    return conn


async def create_pool(dsn: str, min_size: int = 1, max_size: int = 4) -> asyncpg.Pool:
    async with connecting():
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, init=register_vector, reset=_keep_session
        )
    assert pool is not None
    return pool


@contextlib.asynccontextmanager
async def connecting() -> AsyncIterator[None]:
    """Sort what a connection attempt raises: configuration, or an outage.

    A server that answers and refuses the connection is misconfigured, not down: a database
    or role that does not exist, a wrong password, a ``pg_hba.conf`` without an entry, a
    setting from the DSN it does not know. Waiting fixes none of them, and retrying forever
    would hide them: ``ConfigError`` naming ``postgres.dsn`` (exit 2). A server that does not
    answer, is starting up or shutting down, or has no connection left is ``Unreachable``:
    ``run`` waits for it, a one-shot command stops (exit 5).
    """
    try:
        yield
    except asyncpg.ClientConfigurationError as exc:  # an InterfaceError: before PG_UNAVAILABLE
        raise ConfigError(f"{DSN_SETTING}: {exc}") from None
    except PG_UNAVAILABLE as exc:
        raise Unreachable(f"{DSN_SETTING}: postgres is unreachable: {exc!r}") from exc
    except asyncpg.PostgresError as exc:
        raise ConfigError(f"{DSN_SETTING}: the server refused the connection: {exc}") from None


async def check_schema(conn: Conn, dimension: int) -> None:
    """Refuse to start against a missing table, one of another vector dimension, or a
    column a later migration added: ``embeddings``' sparse, chunk and media (every write
    names them, NULL or 0 when unused), ``label_vectors``' withdrawn (every label set's read
    names it)."""
    typmod = await conn.fetchval(
        "SELECT a.atttypmod FROM pg_attribute a "
        "WHERE a.attrelid = to_regclass('embeddings') AND a.attname = 'embedding'"
    )
    if typmod is None:
        raise SchemaError("table `embeddings` does not exist: run `embedding-worker migrate` first")
    if typmod != dimension:
        raise SchemaError(
            f"table `embeddings` holds {typmod}-d vectors but the provider is configured for "
            f"{dimension}-d; use the matching dimension, or migrate the model into a new "
            "database (the stored vectors cannot be mixed)"
        )
    for table, column, migration in (
        ("embeddings", "sparse", "0008_sparse.sql"),
        ("embeddings", "chunk", "0010_chunks.sql"),
        ("embeddings", "media", "0012_multimodal.sql"),
        ("label_vectors", "withdrawn", "0013_withdrawn_decisions.sql"),
    ):
        if not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1) "
            "AND attname = $2 AND NOT attisdropped)",
            table,
            column,
        ):
            raise SchemaError(
                f"table `{table}` has no `{column}` column (migration {migration}): run "
                "`embedding-worker migrate`"
            )


def _keys(changes: Iterable[Change]) -> tuple[list[str], list[str]]:
    namespaces, ids = [], []
    for c in changes:
        namespaces.append(c.namespace)
        ids.append(c.id)
    return namespaces, ids


async def stored_hashes(
    conn: Conn, keys: Sequence[tuple[str, str]], model: str, dimension: int, sparse: bool = False
) -> dict[tuple[str, str], bytes]:
    """Content hashes already embedded with this model and dimension (and, with ``sparse``,
    with a sparse vector: rows stored before output_type became dense&sparse are embedded
    again when their event comes, not kept without one)."""
    if not keys:
        return {}
    # Both arrays in one primary-key index scan (a join with unnest() may be planned as a
    # hash join over the whole table); pairs of the cross product that were not asked for
    # are dropped here.
    rows = await conn.fetch(
        "SELECT namespace, id, content_hash FROM embeddings "
        "WHERE namespace = ANY($1::text[]) AND id = ANY($2::text[]) "
        "AND model = $3 AND dimension = $4 AND (NOT $5 OR sparse IS NOT NULL)",
        sorted({k[0] for k in keys}),
        [k[1] for k in keys],
        model,
        dimension,
        sparse,
    )
    wanted = set(keys)
    found = {(r["namespace"], r["id"]): r["content_hash"] for r in rows}
    return {k: h for k, h in found.items() if k in wanted}


async def load_offsets(conn: Conn, group_id: str, topic: str) -> dict[int, int]:
    rows = await conn.fetch(
        "SELECT partition, next_offset FROM consumer_offsets WHERE group_id = $1 AND topic = $2",
        group_id,
        topic,
    )
    return {r["partition"]: r["next_offset"] for r in rows}


def newest_per_key(changes: Iterable[Change]) -> list[Change]:
    """One change per key (the newest version): one statement may touch a row only once."""
    best: dict[tuple[str, str], Change] = {}
    for c in changes:
        seen = best.get(c.key)
        if seen is None or (seen.event_time, seen.offset) < (c.event_time, c.offset):
            best[c.key] = c
    return list(best.values())


async def write(
    conn: Conn,
    changes: Sequence[Change],
    offsets: dict[tuple[str, int], int],
    group_id: str,
    model: str,
    dimension: int,
    within: Callable[[Conn], Awaitable[None]] | None = None,
) -> WriteResult:
    """Apply ``changes`` and store ``offsets`` atomically (``within`` joins the transaction).

    A small write of embedded rows alone is one statement (``UPSERT_AND_STORE_OFFSETS``).
    From ``DIRECT_FROM_ROWS`` rows on, rows for keys that have neither a row nor a tombstone
    are first copied straight into the table; the rest take the guarded statement. Should
    another writer insert one of those keys in between (two workers during a rebalance),
    the COPY fails on the primary key; should one be deleted in between, a second look
    after the COPY sees its tombstone: either way the whole transaction rolls back and is
    redone with every row guarded (so the direct path is never less safe than the guarded
    statement, whose tombstone check sees the snapshot of its own start). Both redo
    triggers come before ``within`` is called, so it runs once, in the transaction that
    commits.
    """
    latest = newest_per_key(changes)
    split = _Split(
        embedded=[c for c in latest if c.op == "upsert" and c.vector is not None],
        unchanged=[c for c in latest if c.op == "upsert" and c.vector is None and c.unchanged],
        deletes=[c for c in latest if c.op == "delete"],
    )
    args = (conn, split, offsets, group_id, model, dimension, within)
    try:
        return await _write(*args, direct=len(split.embedded) >= DIRECT_FROM_ROWS)
    except _Redo:
        return await _write(*args, direct=False)


@dataclass
class _Split:
    embedded: list[Change]
    unchanged: list[Change]
    deletes: list[Change]


async def _write(
    conn: Conn,
    split: _Split,
    offsets: dict[tuple[str, int], int],
    group_id: str,
    model: str,
    dimension: int,
    within: Callable[[Conn], Awaitable[None]] | None,
    *,
    direct: bool,
) -> WriteResult:
    result = WriteResult()
    alone = not (direct or split.unchanged or split.deletes or within)
    async with contextlib.nullcontext() if alone else conn.transaction():
        guarded = split.embedded
        if direct:
            guarded, copied = await _copy_new(conn, split.embedded, model, dimension)
            result.upserted += copied
        *columns, sparse, chunk, media = _columns(guarded)
        result.upserted += await conn.fetchval(
            UPSERT_AND_STORE_OFFSETS,
            model,
            dimension,
            *columns,
            group_id,
            *_offset_columns(offsets),
            sparse,
            chunk,
            media,
        )
        if split.unchanged:
            await _touch(conn, split.unchanged)
        if split.deletes:
            args = (
                *_keys(split.deletes),
                [c.event_time for c in split.deletes],
                [c.offset for c in split.deletes],
            )
            await conn.execute(TOMBSTONE, *args)
            await conn.execute(DELETE, *args)
        if within is not None:
            await within(conn)
    return result


async def _copy_new(
    conn: Conn, embedded: list[Change], model: str, dimension: int
) -> tuple[list[Change], int]:
    """COPY the rows whose keys are new; return the others, to be guarded, and the number
    of rows copied."""
    ns, ids = _keys(embedded)
    existing = {(r[0], r[1]) for r in await conn.fetch(EXISTING, sorted(set(ns)), ids)}
    new = [c for c in embedded if c.key not in existing]
    records = [(*row, model, dimension) for c in new for row in copy_records(c)]
    if new:
        try:
            await conn.copy_records_to_table("embeddings", records=records, columns=DIRECT_COLUMNS)
        except asyncpg.UniqueViolationError:
            raise _Redo from None
        new_ns, new_ids = _keys(new)
        if await conn.fetchval(TOMBSTONED_SINCE, sorted(set(new_ns)), new_ids):
            raise _Redo
    return [c for c in embedded if c.key in existing], len(records)


async def _touch(conn: Conn, unchanged: list[Change]) -> None:
    ns, ids = _keys(unchanged)
    await conn.execute(
        TOUCH,
        ns,
        ids,
        [c.metadata_json for c in unchanged],
        [c.topic for c in unchanged],
        [c.partition for c in unchanged],
        [c.offset for c in unchanged],
        [c.event_time for c in unchanged],
        [c.content_hash for c in unchanged],
    )


def copy_records(c: Change) -> list[tuple[object, ...]]:
    """A change's rows (one, or one per chunk of a chunked document, each with the
    document's metadata and content hash), values in ``UPSERT_COLUMNS`` order (the rows COPY
    sends; the benchmarks' raw COPY sends the same)."""
    return [
        (
            c.namespace,
            c.id,
            np.asarray(text.vector, dtype=np.float32),
            text.text,
            c.content_hash,
            c.text_type.value,
            c.metadata_json,
            c.truncated,
            c.topic,
            c.partition,
            c.offset,
            c.event_time,
            text.sparse,
            text.chunk,
            c.media_json,
        )
        for text in (c.pieces or (c,))
    ]


def _columns(changes: list[Change]) -> list[list[object]]:
    """``UPSERT_COLUMNS`` as arrays (vectors wrapped: asyncpg would read an array as rows)."""
    columns: list[list[object]] = [[] for _ in UPSERT_COLUMNS]
    for c in changes:
        for row in copy_records(c):
            for column, value in zip(columns, row, strict=True):
                column.append(value)
    columns[2] = [Vector(cast(np.ndarray, v)) for v in columns[2]]
    return columns


def _offset_columns(offsets: dict[tuple[str, int], int]) -> list[list[Any]]:
    items = list(offsets.items())
    return [[tp[0] for tp, _ in items], [tp[1] for tp, _ in items], [o for _, o in items]]
