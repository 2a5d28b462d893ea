"""The HNSW index on a real PostgreSQL/pgvector: built, used by search, replaced, dropped."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from tests.conftest import Env, migrate_db
from tests.integration.test_cli import _env
from tests.processes import cli
from worker.config import ConfigError
from worker.read import index
from worker.read.search import nearest


async def fill(env: Env, dimension: int, rows: int = 300) -> np.ndarray:
    """Rows of random unit vectors in namespaces a (even ids) and b (odd ids), model m.
    Random vectors are fine for correctness; benchmarks use real ones (HNSW inserts random
    vectors several times slower than real embeddings)."""
    await migrate_db(env, dimension)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(rows, dimension)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    conn = await env.connect()
    try:
        await conn.executemany(
            "INSERT INTO embeddings (namespace, id, embedding, content, content_hash, model, "
            "dimension, source_topic, source_partition, source_offset, event_time) "
            "VALUES ($1, $2, $3, $4, $5, 'm', $6, 't', 0, $7, $8)",
            [
                ("ab"[i % 2], str(i), v, f"row {i}", b"h", dimension, i, datetime.now(UTC))
                for i, v in enumerate(vectors)
            ],
        )
    finally:
        await conn.close()
    return vectors


async def plan(env: Env, query: np.ndarray) -> str:
    """The plan of search's query with sequential scans off: can it use the index at all?"""
    conn = await env.connect()
    try:
        async with conn.transaction():
            order = await index.search_order(conn, len(query), 10)
            await conn.execute("SET LOCAL enable_seqscan = off")
            rows = await conn.fetch(
                f"EXPLAIN SELECT id FROM embeddings WHERE model = 'm' ORDER BY {order} LIMIT 10",
                query,
            )
    finally:
        await conn.close()
    return "\n".join(r[0] for r in rows)


async def test_index_is_built_used_by_filtered_search_and_dropped(env: Env) -> None:
    vectors = await fill(env, 512)
    query = vectors[7] + 0.5 * vectors[8]
    conn = await env.connect()
    try:
        exact = [h.id for h in await nearest(conn, query, "m", 10, namespace="a")]
        assert await index.state(conn) is None
        built, new = await index.create(conn, 512, 8, 32, "64MB")
        assert new and built.valid and not built.halfvec
        assert "USING hnsw (embedding vector_cosine_ops)" in built.definition
        assert "m='8'" in built.definition and "ef_construction='32'" in built.definition
        again, new = await index.create(conn, 512, 16, 64, None)
        assert not new and again == built, "a valid index is kept as it is"
        approximate = [h.id for h in await nearest(conn, query, "m", 10, namespace="a")]
    finally:
        await conn.close()
    assert f"Index Scan using {index.NAME}" in await plan(env, query)
    # The namespace filter keeps half of the rows: iterative scans still give 10.
    assert len(approximate) == 10 and all(int(i) % 2 == 0 for i in approximate)
    assert len(set(approximate) & set(exact)) >= 8, (approximate, exact)
    conn = await env.connect()
    try:
        assert await index.drop(conn)
        assert await index.state(conn) is None
        assert not await index.drop(conn)
    finally:
        await conn.close()


async def test_above_2000_dimensions_the_index_is_on_halfvec_and_search_uses_it(
    env: Env,
) -> None:
    vectors = await fill(env, 2048, rows=120)
    conn = await env.connect()
    try:
        built, _ = await index.create(conn, 2048, 16, 64, None)
        assert built.halfvec and "halfvec_cosine_ops" in built.definition
        hits = await nearest(conn, vectors[3], "m", 5)
    finally:
        await conn.close()
    assert hits[0].id == "3" and hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert len(hits) == 5
    assert f"Index Scan using {index.NAME}" in await plan(env, vectors[3])


async def test_an_invalid_index_is_reported_ignored_by_search_and_replaced(env: Env) -> None:
    vectors = await fill(env, 64, rows=50)
    conn = await env.connect()
    try:
        await index.create(conn, 64, 16, 64, None)
        # What an interrupted CREATE INDEX CONCURRENTLY leaves behind.
        await conn.execute(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = $1::regclass", index.NAME
        )
        broken = await index.state(conn)
        assert broken is not None and not broken.valid
        async with conn.transaction():
            assert await index.search_order(conn, 64, 5) == "embedding <=> $1"
        rebuilt, new = await index.create(conn, 64, 16, 64, None)
        assert new and rebuilt.valid
        assert len(await nearest(conn, vectors[0], "m", 5)) == 5
    finally:
        await conn.close()


async def test_bad_parameters_are_refused_before_anything_is_built(env: Env) -> None:
    await migrate_db(env, 64)
    conn = await env.connect()
    try:
        with pytest.raises(ConfigError, match="at least 2 x m"):
            await index.create(conn, 64, 16, 20, None)
        with pytest.raises(ConfigError, match="like 1GB"):
            await index.create(conn, 64, 16, 64, "lots")
        with pytest.raises(ConfigError, match="at most 4000"):
            index.statement(4096, 16, 64)
        assert await index.state(conn) is None
    finally:
        await conn.close()


async def test_index_command(env: Env) -> None:
    await fill(env, 512, rows=40)
    settings = _env(env)
    code, out, err = await cli("index", "status", **settings)
    assert code == 0, err
    assert "search is exact" in out
    code, out, err = await cli("index", "create", "--m", "8", "--ef-construction", "32", **settings)
    assert code == 0, err
    assert "m='8'" in out and "valid" in out
    code, out, _ = await cli("index", "status", **settings)
    assert "hnsw" in out and "valid" in out
    code, _, err = await cli("index", "create", "--ef-construction", "8", **settings)
    assert code == 2 and "at least 2 x m" in err
    code, out, _ = await cli("index", "drop", **settings)
    assert (code, out.strip()) == (0, f"dropped {index.NAME}")


async def test_search_uses_the_index_where_postgres_would_plan_generically(env: Env) -> None:
    """asyncpg prepares each statement, and from its sixth run Postgres may use a generic
    plan: for search's optional filters (``$3 IS NULL OR namespace = $3``) that is a
    sequential scan (found by benchmarks/search_speed.py). Search asks for custom plans;
    here the session asks for generic ones from the first run. (On fewer rows, with search's
    ``hnsw.ef_search`` of 200, an exact scan is the cheaper plan either way.)"""
    vectors = await fill(env, 512, rows=10000)
    conn = await env.connect()
    try:
        await index.create(conn, 512, 16, 64, None)
        await conn.execute("ANALYZE embeddings")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        async with conn.transaction():
            for v in vectors[:10]:
                assert len(await nearest(conn, v, "m", 5, namespace="a")) == 5
            scans = await conn.fetchval(
                "SELECT pg_stat_get_xact_numscans($1::regclass)", index.NAME
            )
    finally:
        await conn.close()
    assert scans == 10, f"{scans} of 10 searches used the index"
