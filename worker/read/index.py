"""``embedding-worker index``: the indexes that keep search fast on a large table, HNSW for
dense search, (``--sparse``) HNSW for sparse search and (``--lexical``) GIN for lexical search.

The migrations do not create it: keeping HNSW up to date is the ceiling of real-time
ingest (benchmark scenario 5: ~20x fewer rows/s with one), so the operator picks the
moment: after a backfill, or from the start when search latency matters more than ingest.
It is built CONCURRENTLY, so workers keep writing meanwhile; a build that was interrupted
leaves an invalid index behind, which ``status`` reports and ``create`` replaces. pgvector's
HNSW indexes ``vector`` up to 2,000 dimensions: above that (text-embedding-v4 at 2,048) the
index is on the ``halfvec`` cast, and search orders by that same expression to use it.
The lexical option (docs/retrieval.md) stores each row's words, ``embeddings_lexical(content)``
of migration 0006, in a generated column with a GIN index; lexical search reads the column
when it exists (fast matching and ranking) and computes the words per scanned row otherwise.
The sparse option indexes the ``sparse`` column of migration 0008 by inner product; every
stored sparse vector fits it (the worker keeps a text's 1,000 heaviest tokens, pgvector's
limit), so it can be built at any time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from worker.config import ConfigError
from worker.sinks.postgres import Conn

NAME = "embeddings_embedding_hnsw"
# The lexical side's stored words and their GIN index (``create_lexical``).
LEXICAL_COLUMN = "content_tsv"
LEXICAL_NAME = "embeddings_content_tsv"
ADD_LEXICAL_COLUMN = (
    f"ALTER TABLE embeddings ADD COLUMN IF NOT EXISTS {LEXICAL_COLUMN} tsvector "
    "GENERATED ALWAYS AS (embeddings_lexical(content)) STORED"
)
LEXICAL_STATEMENT = (
    f"CREATE INDEX CONCURRENTLY {LEXICAL_NAME} ON embeddings USING gin ({LEXICAL_COLUMN})"
)
# The sparse side's HNSW index (``create_sparse``): by inner product, as sparse search ranks.
SPARSE_NAME = "embeddings_sparse_hnsw"
MAX_VECTOR_DIMENSIONS = 2000
MAX_HALFVEC_DIMENSIONS = 4000
# A Postgres memory size, as maintenance_work_mem takes it (e.g. 512MB, 2GB).
MEMORY = re.compile(r"^\d+\s*(kB|MB|GB|TB)$")


@dataclass(frozen=True)
class Index:
    definition: str
    valid: bool  # false: an interrupted CONCURRENTLY build, unused by queries
    size_bytes: int

    @property
    def halfvec(self) -> bool:
        return "halfvec" in self.definition


@dataclass(frozen=True)
class Progress:
    phase: str
    done: int
    total: int  # blocks or tuples of the current phase, as Postgres reports them


def statement(dimension: int, m: int, ef_construction: int) -> str:
    if dimension > MAX_HALFVEC_DIMENSIONS:
        raise ConfigError(
            f"pgvector's HNSW indexes at most {MAX_HALFVEC_DIMENSIONS} dimensions "
            f"(as halfvec); the table has {dimension}"
        )
    if dimension > MAX_VECTOR_DIMENSIONS:
        target = f"(embedding::halfvec({dimension})) halfvec_cosine_ops"
    else:
        target = "embedding vector_cosine_ops"
    return (
        f"CREATE INDEX CONCURRENTLY {NAME} ON embeddings USING hnsw ({target}) "
        f"WITH (m = {int(m)}, ef_construction = {int(ef_construction)})"
    )


def sparse_statement(m: int, ef_construction: int) -> str:
    return (
        f"CREATE INDEX CONCURRENTLY {SPARSE_NAME} ON embeddings USING hnsw "
        f"(sparse sparsevec_ip_ops) WITH (m = {int(m)}, ef_construction = {int(ef_construction)})"
    )


async def state(conn: Conn, name: str = NAME) -> Index | None:
    row = await conn.fetchrow(
        "SELECT pg_get_indexdef(i.indexrelid) AS definition, i.indisvalid AS valid, "
        "pg_relation_size(i.indexrelid) AS size FROM pg_index i "
        "WHERE i.indexrelid = to_regclass($1)",
        name,
    )
    if row is None:
        return None
    return Index(row["definition"], row["valid"], row["size"])


async def progress(conn: Conn) -> Progress | None:
    """The build in progress on ``embeddings``, as another session sees it."""
    row = await conn.fetchrow(
        "SELECT phase, blocks_done, blocks_total, tuples_done, tuples_total "
        "FROM pg_stat_progress_create_index WHERE relid = 'embeddings'::regclass"
    )
    if row is None:
        return None
    if row["tuples_total"]:
        return Progress(row["phase"], row["tuples_done"], row["tuples_total"])
    return Progress(row["phase"], row["blocks_done"], row["blocks_total"])


def check(m: int, ef_construction: int, maintenance_work_mem: str | None) -> None:
    if m < 2 or m > 100 or ef_construction < 4 or ef_construction > 1000:
        raise ConfigError("HNSW takes m in 2..100 and ef_construction in 4..1000")
    if ef_construction < 2 * m:
        raise ConfigError(f"ef_construction must be at least 2 x m ({2 * m})")
    if maintenance_work_mem is not None and not MEMORY.match(maintenance_work_mem):
        raise ConfigError(
            f"maintenance_work_mem takes a size like 1GB, got {maintenance_work_mem!r}"
        )


async def create(
    conn: Conn, dimension: int, m: int, ef_construction: int, maintenance_work_mem: str | None
) -> tuple[Index, bool]:
    """Build the index unless a valid one exists; (the index, whether it was built now)."""
    check(m, ef_construction, maintenance_work_mem)
    return await build(conn, NAME, statement(dimension, m, ef_construction), maintenance_work_mem)


async def build(
    conn: Conn, name: str, sql: str, maintenance_work_mem: str | None = None
) -> tuple[Index, bool]:
    """Run ``sql`` (a CREATE INDEX CONCURRENTLY of ``name``) unless a valid index of that
    name exists; an invalid one (an interrupted build) is dropped first."""
    existing = await state(conn, name)
    if existing is not None and existing.valid:
        return existing, False
    if existing is not None:
        await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
    if maintenance_work_mem is not None:
        await conn.execute(f"SET maintenance_work_mem = '{maintenance_work_mem}'")
    await conn.execute(sql)
    built = await state(conn, name)
    assert built is not None
    return built, True


async def drop(conn: Conn, name: str = NAME) -> bool:
    existing = await state(conn, name)
    await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
    return existing is not None


async def create_sparse(
    conn: Conn, m: int, ef_construction: int, maintenance_work_mem: str | None
) -> tuple[Index, bool]:
    check(m, ef_construction, maintenance_work_mem)
    return await build(
        conn, SPARSE_NAME, sparse_statement(m, ef_construction), maintenance_work_mem
    )


# The fewest candidates an HNSW search keeps (``hnsw.ef_search``; pgvector's default is 40).
# Recall@10 against exact search on 100,000 distinct real texts (docs/retrieval.md, "Search
# speed"): 0.89 at 40, 0.944-0.953 at 100, 0.974-0.977 at 200, for a dense p50 of ~9 ms
# instead of ~2 at 40 there.
EF_SEARCH = 200


async def _tune_hnsw(conn: Conn, version: str, k: int) -> None:
    """The transaction set for a top-k query through an HNSW index (see ``search_order``)."""
    major_minor = tuple(int(p) for p in version.split(".")[:2])
    # SET LOCAL, as set_config(..., true), for all settings in one round trip.
    await conn.execute(
        "SELECT set_config('hnsw.ef_search', $1, true), "
        "set_config('plan_cache_mode', 'force_custom_plan', true)"
        + (
            ", set_config('hnsw.iterative_scan', 'strict_order', true)"
            if major_minor >= (0, 8)
            else ""
        ),
        str(max(EF_SEARCH, min(int(k), 1000))),
    )


async def _valid(conn: Conn, name: str) -> tuple[str, str] | None:
    """(definition, pgvector version) of a valid index ``name``, or None."""
    row = await conn.fetchrow(
        "SELECT pg_get_indexdef(i.indexrelid) AS definition, "
        "(SELECT extversion FROM pg_extension WHERE extname = 'vector') AS version "
        "FROM pg_index i WHERE i.indexrelid = to_regclass($1) AND i.indisvalid",
        name,
    )
    return None if row is None else (str(row["definition"]), str(row["version"]))


async def sparse_order(conn: Conn, k: int) -> str:
    """How a top-k sparse query (query vector ``$1``) must order: with the sparse index,
    by ``sparse <#> $1`` alone (the only order pgvector's index answers), the transaction
    set as for dense search; without it, exact, ties broken by namespace, id and chunk."""
    found = await _valid(conn, SPARSE_NAME)
    if found is None:
        await conn.execute("SELECT set_config('plan_cache_mode', 'force_custom_plan', true)")
        return "sparse <#> $1, namespace, id, chunk"
    await _tune_hnsw(conn, found[1], k)
    return "sparse <#> $1"


async def search_order(conn: Conn, dimension: int, k: int) -> str:
    """How a top-k query over ``embeddings`` must order (query vector ``$1``) to use the
    index, with the transaction set for it: ``hnsw.ef_search`` at least ``EF_SEARCH`` and k;
    on pgvector 0.8+, iterative scans, so a filter (model, namespace, metadata) still yields
    k rows; and custom plans: from a prepared statement's sixth run Postgres may switch to a generic
    plan, whose guess for the ``$3 IS NULL OR namespace = $3`` filters makes a sequential
    scan look cheaper than the index (measured on 10,000 rows: exact, 45-60 ms, not 1-2 ms)."""
    found = await _valid(conn, NAME)
    if found is None:
        return "embedding <=> $1"
    definition, version = found
    await _tune_hnsw(conn, version, k)
    if "halfvec" in definition:
        return f"embedding::halfvec({dimension}) <=> $1::halfvec({dimension})"
    return "embedding <=> $1"


async def has_lexical_column(conn: Conn) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'embeddings'::regclass "
            "AND attname = $1 AND NOT attisdropped)",
            LEXICAL_COLUMN,
        )
    )


async def create_lexical(conn: Conn, maintenance_work_mem: str | None = None) -> tuple[Index, bool]:
    """The stored words (adding the column rewrites the table once, under a lock that holds
    writers back meanwhile) and their GIN index (CONCURRENTLY)."""
    await conn.execute(ADD_LEXICAL_COLUMN)
    return await build(conn, LEXICAL_NAME, LEXICAL_STATEMENT, maintenance_work_mem)


async def drop_lexical(conn: Conn) -> bool:
    """The index, then the column (dropping a column does not rewrite the table)."""
    existed = await drop(conn, LEXICAL_NAME) or await has_lexical_column(conn)
    await conn.execute(f"ALTER TABLE embeddings DROP COLUMN IF EXISTS {LEXICAL_COLUMN}")
    return existed
