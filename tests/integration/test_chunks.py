"""Chunking of long content (oversize_policy = chunk, issue 17) through the real worker: a
long document becomes one row per chunk; an update replaces them all, a shorter one leaves
none behind; a tombstone removes them all; unchanged content is not embedded again; search
returns each document once, by its best chunk."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fakeapi import FakeEmbeddingServer
from tests.conftest import Env, dashscope, migrate_db, running
from tests.integration.test_sparse import _documented_sql
from worker.chunking import split
from worker.embedding.providers import create_embedder
from worker.events import TextType
from worker.read.search import Mode, search

DIMENSION = 64
BUDGET = {"max_tokens": 40, "overlap_tokens": 8}


def _text(tag: str, sentences: int) -> str:
    return " ".join(
        f"The {tag} report, part {i}, mentions token{tag}{i} once." for i in range(sentences)
    )


LONG = _text("alpha", 30)
OTHER = _text("beta", 20)


def _chunks(text: str) -> list[str]:
    return split(text, BUDGET["max_tokens"], BUDGET["overlap_tokens"])


def _settings(env: Env, fake: FakeEmbeddingServer) -> Any:
    return env.settings(dashscope(fake, DIMENSION), oversize_policy="chunk", chunking=BUDGET)


async def _rows(env: Env) -> dict[str, list[tuple[int, str, str]]]:
    conn = await env.connect()
    try:
        rows = await conn.fetch(
            "SELECT id, chunk, content, metadata::text AS metadata, content_hash FROM embeddings "
            "ORDER BY id, chunk"
        )
    finally:
        await conn.close()
    out: dict[str, list[tuple[int, str, str]]] = {}
    for r in rows:
        out.setdefault(r["id"], []).append((r["chunk"], r["content"], r["metadata"]))
    hashes = {(r["id"], r["content_hash"]) for r in rows}
    assert len(hashes) == len(out), "every row of a document has the document's hash"
    return out


async def _apply(env: Env, fake: FakeEmbeddingServer, events: list[dict[str, Any] | None]) -> None:
    high = await env.produce(events)
    async with running(_settings(env, fake)):
        await env.wait_for_offsets(high)


@pytest.fixture
async def migrated(env: Env) -> Env:
    await migrate_db(env, DIMENSION)
    return env


async def test_a_long_document_is_one_row_per_chunk_with_its_metadata(
    migrated: Env, fake_api: FakeEmbeddingServer
) -> None:
    await _apply(
        migrated,
        fake_api,
        [
            {"id": "long", "text": LONG, "metadata": {"src": "a"}},
            {"id": "short", "text": "A short note.", "metadata": {"src": "b"}},
        ],
    )
    rows = await _rows(migrated)
    chunks = _chunks(LONG)
    assert len(chunks) > 10  # more than one request's worth of texts
    assert rows["long"] == [(i, c, '{"src": "a"}') for i, c in enumerate(chunks)]
    assert rows["short"] == [(0, "A short note.", '{"src": "b"}')]
    assert fake_api.stats()["texts"] == len(chunks) + 1


async def test_an_update_replaces_every_chunk_and_a_shorter_one_leaves_none_behind(
    migrated: Env, fake_api: FakeEmbeddingServer
) -> None:
    await _apply(migrated, fake_api, [{"id": "doc", "text": LONG}])
    assert len((await _rows(migrated))["doc"]) == len(_chunks(LONG))
    await _apply(migrated, fake_api, [{"id": "doc", "text": OTHER, "metadata": {"v": 2}}])
    shorter = _chunks(OTHER)
    assert 1 < len(shorter) < len(_chunks(LONG))
    assert (await _rows(migrated))["doc"] == [(i, c, '{"v": 2}') for i, c in enumerate(shorter)]
    await _apply(migrated, fake_api, [{"id": "doc", "text": "Now a single line."}])
    assert (await _rows(migrated))["doc"] == [(0, "Now a single line.", "{}")]


async def test_a_tombstone_or_a_delete_removes_every_chunk(
    migrated: Env, fake_api: FakeEmbeddingServer
) -> None:
    await _apply(migrated, fake_api, [{"id": "a", "text": LONG}, {"id": "b", "text": OTHER}])
    assert set(await _rows(migrated)) == {"a", "b"}
    delete = json.dumps({"id": "b", "op": "delete"}).encode()
    high = await migrated.produce_raw([(b"a", None), (b"b", delete)])
    async with running(_settings(migrated, fake_api)):
        await migrated.wait_for_offsets(high)
    assert await _rows(migrated) == {}


async def test_unchanged_content_is_not_embedded_again(
    migrated: Env, fake_api: FakeEmbeddingServer
) -> None:
    await _apply(migrated, fake_api, [{"id": "doc", "text": LONG}])
    before = fake_api.stats()["texts"]
    await _apply(migrated, fake_api, [{"id": "doc", "text": LONG, "metadata": {"v": 2}}])
    assert fake_api.stats()["texts"] == before
    rows = (await _rows(migrated))["doc"]
    assert [(i, c) for i, c, _ in rows] == list(enumerate(_chunks(LONG)))
    assert {m for _, _, m in rows} == {'{"v": 2}'}  # the metadata moved on in every row


async def test_search_returns_each_document_once_by_its_best_chunk(
    migrated: Env, fake_api: FakeEmbeddingServer
) -> None:
    await _apply(
        migrated,
        fake_api,
        [{"id": "alpha", "text": LONG}, {"id": "beta", "text": OTHER}, {"id": "x", "text": "x"}],
    )
    settings = _settings(migrated, fake_api)
    embedder = create_embedder(settings.provider)
    target = _chunks(LONG)[7]
    conn = await migrated.connect()
    try:
        for mode in (Mode.DENSE, Mode.LEXICAL, Mode.HYBRID):
            # The fake's vector is the text's: the chunk's own text is its nearest query.
            query = target if mode is Mode.DENSE else "tokenalpha20"
            hits = await search(conn, embedder, query, k=3, mode=mode)
            ids = [h.id for h in hits]
            assert len(ids) == len(set(ids)), (mode, ids)
            assert hits[0].id == "alpha", mode
            best = hits[0]
            # Its snippet is its best chunk's text (hybrid: that of the dense list, which
            # ranks first; the fake's dense vectors know no words).
            assert best.content == _chunks(LONG)[best.chunk], (mode, best)
            if mode is Mode.DENSE:
                assert best.content == target
            elif mode is Mode.LEXICAL:
                assert "tokenalpha20" in best.content
        dense = await search(conn, embedder, target, k=10, mode=Mode.DENSE)
        assert sorted(h.id for h in dense) == ["alpha", "beta", "x"]
        # The documented SQL (docs/retrieval.md) returns the same documents and chunks.
        vector = (await embedder.embed([target], TextType.QUERY)).vectors[0]
        sql = _documented_sql("Dense, one row per document")
        rows = await conn.fetch(sql, vector, embedder.model, None, None)
        assert [(r["id"], r["chunk"], r["content"]) for r in rows] == [
            (h.id, h.chunk, h.content) for h in dense
        ]
        assert [r["score"] for r in rows] == pytest.approx([h.score for h in dense])
    finally:
        await conn.close()
        await embedder.close()
