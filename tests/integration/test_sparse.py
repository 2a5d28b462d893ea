"""Sparse vectors (issue 17): provider.output_type = dense&sparse through the real worker into
the `sparse` column, search --mode sparse and hybrid over them, and the refusals of providers
without sparse output. The fake answers with XLM-R token ids (fakeapi/vocabulary.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fakeapi import FakeEmbeddingServer
from fakeapi.vectors import fake_vector
from fakeapi.vocabulary import sparse_vector, vocabulary
from tests.conftest import Env, dashscope, migrate_db, openai, running
from tests.integration.test_cli import _env
from tests.integration.test_observability import _metrics
from tests.integration.test_retrieval import CATALOGUE, SKU
from tests.processes import cli
from worker.embedding.providers import create_embedder
from worker.embedding.providers.base import SPARSE_MAX_ENTRIES
from worker.embedding.providers.dashscope import SPARSE_DIMENSION
from worker.events import TextType
from worker.read import index
from worker.read.search import Hit, Mode, rrf, search

DIMENSION = 256
# The only row holding this token; nothing else relates it to the query.
INCIDENT = ("inc-1", "Billing run aborted with ERR_7731_QX after the nightly export.", "ops")
# More distinct pieces than pgvector's HNSW index takes: 1,500 whole-word pieces.
LONG = " ".join(
    [
        p[1:]
        for p in vocabulary().pieces[1000:20000]
        if p.startswith("\u2581") and p[1:].isascii() and p[1:].isalpha() and len(p) > 4
    ][:1500]
)
ROWS = [*CATALOGUE, INCIDENT, ("long-1", LONG, "misc")]


def _provider(fake: FakeEmbeddingServer) -> dict[str, Any]:
    return dashscope(fake, DIMENSION, output_type="dense&sparse")


def _sparse_env(env: Env, fake: FakeEmbeddingServer) -> dict[str, str]:
    return _env(
        env,
        EMBEDDING_WORKER_PROVIDER__KIND="dashscope",
        EMBEDDING_WORKER_PROVIDER__BASE_URL=fake.url + "/api/v1",
        EMBEDDING_WORKER_PROVIDER__API_KEY=str(_provider(fake)["api_key"]),
        EMBEDDING_WORKER_PROVIDER__DIMENSION=str(DIMENSION),
        EMBEDDING_WORKER_PROVIDER__OUTPUT_TYPE="dense&sparse",
    )


@pytest.fixture
async def stored(env: Env, fake_api: FakeEmbeddingServer) -> Env:
    await migrate_db(env, DIMENSION)
    high = await env.produce(
        [
            {"id": id, "text": text, "namespace": "shop", "metadata": {"dept": dept}}
            for id, text, dept in ROWS
        ]
    )
    async with running(env.settings(_provider(fake_api))):
        await env.wait_for_offsets(high)
    return env


def _weights(text: str) -> dict[int, float]:
    return {e["index"]: e["value"] for e in sparse_vector(text)}


async def test_sparse_vectors_are_stored_beside_the_dense_ones(stored: Env) -> None:
    conn = await stored.connect()
    try:
        rows = {
            r["id"]: r
            for r in await conn.fetch("SELECT id, content, embedding, sparse FROM embeddings")
        }
    finally:
        await conn.close()
    assert set(rows) == {id for id, _, _ in ROWS}
    for id, text, _ in ROWS:
        row = rows[id]
        assert row["content"] == text
        assert row["embedding"].to_numpy() == pytest.approx(fake_vector(text, DIMENSION))
        stored_sparse = row["sparse"]
        assert stored_sparse.dimensions() == SPARSE_DIMENSION
        weights = _weights(text)
        got = dict(zip(stored_sparse.indices(), stored_sparse.values(), strict=True))
        if len(weights) <= SPARSE_MAX_ENTRIES:
            assert got == pytest.approx(weights), id
    # The long text keeps its 1,000 heaviest tokens, and the index pgvector can build takes it.
    long = _weights(LONG)
    assert len(long) == 1500
    heaviest = sorted(long, key=lambda i: (-long[i], i))[:SPARSE_MAX_ENTRIES]
    kept = rows["long-1"]["sparse"]
    assert set(kept.indices()) == set(heaviest)
    assert min(kept.values()) >= max(long[i] for i in long if i not in set(heaviest))


async def test_sparse_search_finds_the_keyword_only_row_and_filters_apply(
    stored: Env, fake_api: FakeEmbeddingServer
) -> None:
    embedder = create_embedder(stored.settings(_provider(fake_api)).provider)
    conn = await stored.connect()
    try:
        hits = await search(conn, embedder, "ERR_7731_QX", 3, mode=Mode.SPARSE)
        # The score is the inner product of the query's and the row's token weights.
        query, row = _weights("ERR_7731_QX"), _weights(INCIDENT[1])
        expected = sum(w * row.get(i, 0.0) for i, w in query.items())
        assert hits[0].id == "inc-1" and hits[0].score == pytest.approx(expected, rel=1e-5)
        assert all(h.score < hits[0].score for h in hits[1:])
        # The exact code: the two rows that hold it first, then the look-alikes.
        sku = await search(conn, embedder, SKU, 20, "shop", {"dept": "audio"}, Mode.SPARSE)
        assert sku[0].id == "hp-1", [h.id for h in sku]
        assert {h.metadata["dept"] for h in sku} == {"audio"}
        ids = [h.id for h in sku]
        # The speaker shares only the common "-" piece with the query: last.
        assert ids[-1] == "sp-1" and set(ids[:-1]) == {f"hp-{i}" for i in range(1, 7)}, ids
        kitchen = await search(conn, embedder, SKU, 20, "shop", {"dept": "kitchen"}, Mode.SPARSE)
        assert [h.id for h in kitchen][:1] == ["ck-2"]
        assert {h.metadata["dept"] for h in kitchen} == {"kitchen"}
        for mode in Mode:
            assert await search(conn, embedder, SKU, 5, "elsewhere", None, mode) == [], mode
    finally:
        await conn.close()
        await embedder.close()


async def _sparse_plan(env: Env, embedder: Any) -> str:
    """The plan of sparse search's query, sequential scans off: can it use the index?"""
    query = (await embedder.embed(["ERR_7731_QX"], TextType.QUERY)).sparse[0]
    conn = await env.connect()
    try:
        async with conn.transaction():
            order = await index.sparse_order(conn, 3)
            await conn.execute("SET LOCAL enable_seqscan = off")
            rows = await conn.fetch(
                f"EXPLAIN SELECT id FROM embeddings ORDER BY {order} LIMIT 3", query
            )
    finally:
        await conn.close()
    return "\n".join(r[0] for r in rows)


async def test_the_sparse_index_is_built_by_the_command_used_by_search_and_dropped(
    stored: Env, fake_api: FakeEmbeddingServer
) -> None:
    """Every stored sparse vector has <= 1,000 entries (the long row is cut), so pgvector's
    HNSW index builds; search orders so that the index answers, with the same hits."""
    environment = _sparse_env(stored, fake_api)
    embedder = create_embedder(stored.settings(_provider(fake_api)).provider)
    conn = await stored.connect()
    try:
        exact = await search(conn, embedder, "ERR_7731_QX", 3, mode=Mode.SPARSE)
        assert index.SPARSE_NAME not in await _sparse_plan(stored, embedder)
        code, out, err = await cli("index", "status", "--sparse", **environment)
        assert code == 0 and "sparse search is exact" in out, err
        code, out, err = await cli(
            "index", "create", "--sparse", "--m", "8", "--ef-construction", "32", **environment
        )
        assert code == 0, err
        assert "sparsevec_ip_ops" in out and "m='8'" in out and "valid" in out
        assert f"Index Scan using {index.SPARSE_NAME}" in await _sparse_plan(stored, embedder)
        indexed = await search(conn, embedder, "ERR_7731_QX", 3, mode=Mode.SPARSE)
        assert [h.id for h in indexed] == [h.id for h in exact]
        assert [h.score for h in indexed] == pytest.approx([h.score for h in exact])
        code, out, err = await cli("index", "create", "--sparse", "--lexical", **environment)
        assert code == 2 and "not allowed with" in err
        code, out, _ = await cli("index", "drop", "--sparse", **environment)
        assert (code, out.strip()) == (0, f"dropped {index.SPARSE_NAME}")
        assert index.SPARSE_NAME not in await _sparse_plan(stored, embedder)
    finally:
        await conn.close()
        await embedder.close()


async def test_hybrid_fuses_dense_and_sparse_through_the_command_line(
    stored: Env, fake_api: FakeEmbeddingServer
) -> None:
    environment = _sparse_env(stored, fake_api)

    async def lines(*args: str) -> list[Hit]:
        code, out, err = await cli(
            "search", SKU, "--namespace", "shop", *args, "--json", **environment
        )
        assert code == 0, err
        return [Hit(**json.loads(line)) for line in out.splitlines()]

    dense = await lines("-k", "8", "--mode", "dense")
    tokens = await lines("-k", "8", "--mode", "sparse")
    hybrid = await lines("-k", "5", "--mode", "hybrid", "--candidates", "8", "--rrf-k", "10")
    expected = rrf([dense, tokens], k=10, limit=5)
    assert [h.id for h in hybrid] == [h.id for h in expected]
    assert [h.score for h in hybrid] == pytest.approx([h.score for h in expected])
    assert tokens[0].id == "hp-1"


async def test_providers_without_sparse_output_refuse_it_by_name(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, DIMENSION)
    for provider in (
        {
            "EMBEDDING_WORKER_PROVIDER__KIND": "openai",
            "EMBEDDING_WORKER_PROVIDER__BASE_URL": fake_api.openai_url,
            "EMBEDDING_WORKER_PROVIDER__API_KEY": str(openai(fake_api)["api_key"]),
        },
        {"EMBEDDING_WORKER_PROVIDER__KIND": "local"},
    ):
        code, _, err = await cli(
            "run", **_env(env, **provider, EMBEDDING_WORKER_PROVIDER__OUTPUT_TYPE="dense&sparse")
        )
        assert code == 2, err
        assert "provider.output_type" in err and "'dashscope'" in err and "Traceback" not in err
    # A dense-only provider asked for sparse search: the setting named, no model loaded.
    code, out, err = await cli("search", "x", "--mode", "sparse", **_env(env))
    assert (code, out) == (2, "")
    assert "provider.output_type = 'dense&sparse'" in err and "Traceback" not in err


async def test_a_table_without_the_sparse_column_is_refused_with_the_migration_named(
    env: Env,
) -> None:
    await migrate_db(env, 512)
    conn = await env.connect()
    try:
        await conn.execute("ALTER TABLE embeddings DROP COLUMN sparse")
    finally:
        await conn.close()
    code, _, err = await cli("search", "x", **_env(env))
    assert code == 3, err
    assert "0008_sparse.sql" in err and "embedding-worker migrate" in err


async def test_rows_stored_without_sparse_vectors_are_embedded_again_when_switched_on(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    """The hash skip counts a row as embedded only if it has what the provider now returns:
    the same content after output_type became dense&sparse gets its sparse vector."""
    await migrate_db(env, DIMENSION)
    event = {"id": "inc-1", "text": INCIDENT[1], "namespace": "ops"}

    async def stored_sparse() -> Any:
        conn = await env.connect()
        try:
            return await conn.fetchval("SELECT sparse FROM embeddings WHERE id = 'inc-1'")
        finally:
            await conn.close()

    high = await env.produce([event])
    async with running(env.settings(dashscope(fake_api, DIMENSION))):
        await env.wait_for_offsets(high)
    assert await stored_sparse() is None
    high = await env.produce([event])
    async with running(env.settings(_provider(fake_api))) as worker:
        await env.wait_for_offsets(high)
        assert worker.pipeline is not None and worker.pipeline.stats.unchanged == 0
    got = await stored_sparse()
    assert dict(zip(got.indices(), got.values(), strict=True)) == pytest.approx(
        _weights(INCIDENT[1])
    )
    # Once it has one, the same content again is unchanged (no request).
    high = await env.produce([event])
    async with running(env.settings(_provider(fake_api))) as worker:
        await env.wait_for_offsets(high)
        assert worker.pipeline is not None and worker.pipeline.stats.unchanged == 1


def _documented_sql(after: str) -> str:
    """The first SQL block of docs/retrieval.md after the line starting with `after`."""
    text = (Path(__file__).parents[2] / "docs" / "retrieval.md").read_text()
    rest = text[text.index("\n" + after) :]
    return rest.split("```sql\n", 1)[1].split("```", 1)[0]


async def test_the_documented_sql_returns_what_search_returns(
    stored: Env, fake_api: FakeEmbeddingServer
) -> None:
    embedder = create_embedder(stored.settings(_provider(fake_api)).provider)
    # Only the parameters a statement uses may be sent: $6 (the sparse vector) renumbered.
    sparse_sql = _documented_sql("Sparse, the rows sharing").replace("$6", "$1")
    hybrid_sql = _documented_sql("Hybrid with sparse vectors").replace("$6", "$5")
    conn = await stored.connect()
    try:
        for query, namespace, where in [
            (SKU, "shop", None),
            ("ERR_7731_QX billing", None, None),
            ("headphones noise cancelling", "shop", {"dept": "audio"}),
        ]:
            embedded = await embedder.embed([query], TextType.QUERY)
            assert embedded.sparse is not None
            dense, tokens = embedded.vectors[0], embedded.sparse[0]
            filters = None if where is None else json.dumps(where)
            rows = await conn.fetch(sparse_sql, tokens, embedder.model, namespace, filters)
            mine = await search(conn, embedder, query, 10, namespace, where, Mode.SPARSE)
            assert [(r["id"], r["score"]) for r in rows] == [
                (h.id, pytest.approx(h.score)) for h in mine
            ]
            fused = await conn.fetch(hybrid_sql, dense, embedder.model, namespace, filters, tokens)
            mine = await search(conn, embedder, query, 10, namespace, where, Mode.HYBRID)
            assert [r["id"] for r in fused] == [h.id for h in mine], query
            assert [float(r["score"]) for r in fused] == pytest.approx([h.score for h in mine])
    finally:
        await conn.close()
        await embedder.close()


async def test_sparse_metrics_count_the_vectors_their_entries_and_the_cut(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, DIMENSION)
    texts = {"short-1": INCIDENT[1], "long-1": LONG}
    async with running(env.settings(_provider(fake_api))) as worker:
        before = await _metrics(worker)
        assert "sparse_vectors_total" not in before, "nothing sparse yet: not exported"
        high = await env.produce([{"id": id, "text": text} for id, text in texts.items()])
        await env.wait_for_offsets(high)
        after = await _metrics(worker)
    assert after["sparse_vectors_total"] == 2
    short = len(_weights(INCIDENT[1]))
    assert after["sparse_entries_total"] == short + SPARSE_MAX_ENTRIES
    assert after["sparse_at_cap_total"] == 1
