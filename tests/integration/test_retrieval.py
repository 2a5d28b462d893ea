"""Lexical and hybrid search (issue 17): the fusion math, then each mode on rows the real
worker stored with the local model, and the text search configuration fixed at migration."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import Env, migrate_db, running
from tests.integration.test_cli import _env
from tests.processes import cli
from worker.embedding.providers import create_embedder
from worker.embedding.providers.base import Embedder
from worker.read import index
from worker.read.search import Hit, Mode, has_words, lexical, lexical_sql, rrf, search
from worker.sinks.migrate import MigrationError, default_directory, migrate

# --- reciprocal rank fusion ----------------------------------------------------------------


def _hits(*ids: str) -> list[Hit]:
    return [Hit("ns", id, 0.0, None, {}) for id in ids]


def test_rrf_sums_reciprocal_ranks() -> None:
    dense = _hits("a", "b", "c")
    words = _hits("c", "d", "a")
    fused = rrf([dense, words], k=60)
    expected = {
        "a": 1 / 61 + 1 / 63,
        "b": 1 / 62,
        "c": 1 / 63 + 1 / 61,
        "d": 1 / 62,
    }
    assert {h.id: h.score for h in fused} == pytest.approx(expected)
    # a and c tie, as do b and d: the first list's order breaks ties.
    assert [h.id for h in fused] == ["a", "c", "b", "d"]
    assert [h.id for h in rrf([dense, words], k=60, limit=2)] == ["a", "c"]


def test_rrf_constant_decides_between_one_top_rank_and_two_middle_ranks() -> None:
    # x is first in one list only; y is fourth in both: 2/(k+4) > 1/(k+1) only for k > 2.
    one = _hits("x", "p", "s", "y")
    two = _hits("q", "r", "t", "y")
    assert rrf([one, two], k=60)[0].id == "y"
    # k=1: x and q score 1/2 (x seen first), y 2/5, above p and r (1/3).
    assert [h.id for h in rrf([one, two], k=1)][:3] == ["x", "q", "y"]


def test_rrf_of_one_list_keeps_its_order_and_of_none_is_empty() -> None:
    assert [h.id for h in rrf([_hits("a", "b", "c")])] == ["a", "b", "c"]
    assert rrf([]) == [] and rrf([[], []]) == []


def test_same_id_in_two_namespaces_is_two_rows() -> None:
    a = Hit("one", "x", 0.9, "text", {"n": 1})
    b = Hit("two", "x", 0.8, "text", {"n": 2})
    fused = rrf([[a], [b]])
    assert [(h.namespace, h.id) for h in fused] == [("one", "x"), ("two", "x")]
    assert fused[0].metadata == {"n": 1}  # the other fields come with the hit


# --- the modes on a catalogue the real worker stored (local model) -------------------------

SKU = "XK-4471-B"
QUERY = f"headphones {SKU}"
# Look-alike codes: to the model they are all much the same product.
CATALOGUE = [
    ("hp-1", f"Wireless over-ear headphones {SKU} with active noise cancelling.", "audio"),
    (
        "hp-2",
        "Wireless over-ear headphones XK-4417-B with noise cancelling, 30 h battery.",
        "audio",
    ),
    (
        "hp-3",
        "Wireless over-ear headphones XK-4471-D with noise cancelling and a carry case.",
        "audio",
    ),
    ("hp-4", "Wireless over-ear headphones KX-4471-B, noise cancelling, foldable.", "audio"),
    ("hp-5", "Wireless over-ear headphones XK-4771-B with noise cancelling, USB-C.", "audio"),
    ("hp-6", "Wireless over-ear headphones XK-4470-B with noise cancelling, blue.", "audio"),
    ("sp-1", "Portable speaker VB-2290-S, waterproof, twelve hours of music.", "audio"),
    ("kb-1", "Mechanical keyboard with hot-swappable switches and RGB lighting.", "computer"),
    ("ms-1", "Ergonomic wireless mouse with a silent click and six buttons.", "computer"),
    ("ck-1", "Cast iron skillet, pre-seasoned, for searing steak and baking cornbread.", "kitchen"),
    ("ck-2", f"Replacement lid for the skillet; not for the headphones {SKU}.", "kitchen"),
]


@pytest.fixture
async def catalogue(env: Env) -> Env:
    await migrate_db(env, 512)
    high = await env.produce(
        [
            {"id": id, "text": text, "namespace": "shop", "metadata": {"dept": dept}}
            for id, text, dept in CATALOGUE
        ]
    )
    async with running(env.settings()):
        await env.wait_for_offsets(high)
    return env


@pytest.fixture
async def embedder(env: Env) -> AsyncIterator[Embedder]:
    e = create_embedder(env.settings().provider)
    try:
        yield e
    finally:
        await e.close()


async def _json_lines(env: Env, *args: str) -> list[dict[str, Any]]:
    code, out, err = await cli(*args, "--json", **_env(env))
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


async def test_lexical_finds_the_exact_token_that_dense_ranks_low(
    catalogue: Env, embedder: Embedder
) -> None:
    conn = await catalogue.connect()
    try:
        dense = await search(conn, embedder, QUERY, 10, "shop", {"dept": "audio"})
        words = await search(conn, embedder, QUERY, 10, "shop", {"dept": "audio"}, Mode.LEXICAL)
    finally:
        await conn.close()
    dense_ids = [h.id for h in dense]
    # Dense sees headphones with a code like this one: the one with it is not first.
    assert dense_ids.index("hp-1") > 0, dense_ids
    # Lexical: the only row with every word of the query comes first.
    assert words[0].id == "hp-1", [h.id for h in words]
    assert words[0].score > words[1].score > 0
    assert [h.score for h in words] == sorted((h.score for h in words), reverse=True)
    assert "sp-1" not in {h.id for h in words}  # none of the words


async def test_hybrid_is_the_fusion_of_the_two_lists(catalogue: Env) -> None:
    base = ("search", QUERY, "--namespace", "shop")
    dense = await _json_lines(catalogue, *base, "-k", "7", "--mode", "dense")
    words = await _json_lines(catalogue, *base, "-k", "7", "--mode", "lexical")
    hybrid = await _json_lines(
        catalogue, *base, "-k", "4", "--mode", "hybrid", "--candidates", "7", "--rrf-k", "10"
    )
    expected = rrf([_as_hits(dense), _as_hits(words)], k=10, limit=4)
    assert [h["id"] for h in hybrid] == [h.id for h in expected]
    assert [h["score"] for h in hybrid] == pytest.approx([h.score for h in expected])
    assert "hp-1" in {h["id"] for h in hybrid}
    assert set(hybrid[0]) == {"namespace", "id", "score", "content", "metadata", "chunk"}


def _as_hits(lines: list[dict[str, Any]]) -> list[Hit]:
    return [Hit(**line) for line in lines]


async def test_filters_apply_in_every_mode(catalogue: Env, embedder: Embedder) -> None:
    conn = await catalogue.connect()
    try:
        for mode in (Mode.DENSE, Mode.LEXICAL, Mode.HYBRID):  # sparse: test_sparse.py
            hits = await search(conn, embedder, SKU, 10, "shop", {"dept": "kitchen"}, mode)
            assert hits, mode
            assert {h.metadata["dept"] for h in hits} == {"kitchen"}, mode
            assert await search(conn, embedder, SKU, 10, "elsewhere", None, mode) == [], mode
    finally:
        await conn.close()
    # And through the command line, lexical without loading a model.
    args = ("search", "headphones", "--mode", "lexical", "-k", "20")
    everywhere = await _json_lines(catalogue, *args)
    assert {h["id"] for h in everywhere} == {f"hp-{i}" for i in range(1, 7)} | {"ck-2"}
    assert [h["id"] for h in await _json_lines(catalogue, *args, "--where", "dept=kitchen")] == [
        "ck-2"
    ]


async def test_a_query_without_words_finds_nothing_lexically_and_dense_alone_in_hybrid(
    catalogue: Env, embedder: Embedder
) -> None:
    conn = await catalogue.connect()
    try:
        for query in ("", "   ", "?! -- ..."):
            assert not await has_words(conn, query)
            assert await lexical(conn, query, 5) == []
        hybrid = await search(conn, embedder, "?! -- ...", 3, mode=Mode.HYBRID)
        dense = await search(conn, embedder, "?! -- ...", 3)
        assert [h.id for h in hybrid] == [h.id for h in dense]
    finally:
        await conn.close()
    code, out, err = await cli("search", "?!", "--mode", "lexical", **_env(catalogue))
    assert (code, out) == (0, "")
    assert "no words to match" in err and "'simple'" in err and "Traceback" not in err


# --- the text search configuration -----------------------------------------------------------


async def test_english_configuration_stems_drops_stop_words_and_is_then_fixed(env: Env) -> None:
    conn = await asyncpg.connect(env.dsn)  # no vector codec before the migrations
    try:
        await migrate(conn, 4, text_search_config="english")
        await conn.execute(
            "INSERT INTO embeddings (namespace, id, embedding, content, content_hash, model, "
            "dimension, source_topic, source_partition, source_offset, event_time) "
            "VALUES ('n', 'a', '[1,0,0,0]', 'The cats were running home', '\\x00', 'm', 4, "
            "'t', 0, 0, now())"
        )
        assert [h.id for h in await lexical(conn, "a cat runs")] == ["a"]  # stemmed
        assert not await has_words(conn, "the of and were")
        assert await lexical(conn, "the of and were") == []
        # The table's words are `english` ones: another setting is refused.
        with pytest.raises(MigrationError, match=r"'simple'.*'english'"):
            await migrate(conn, 4)
        assert await migrate(conn, 4, text_search_config="english") == []
    finally:
        await conn.close()


async def test_rows_stored_before_the_migration_are_found_after_it(
    env: Env, tmp_path: Path
) -> None:
    for path in default_directory().glob("*.sql"):
        if path.name != "0006_lexical.sql":  # later ones too: 0006 may come after them
            shutil.copy(path, tmp_path)
    conn = await asyncpg.connect(env.dsn)
    try:
        await migrate(conn, 512, tmp_path)  # the local model's dimension, for the CLI
        await conn.execute(
            "INSERT INTO embeddings (namespace, id, embedding, content, content_hash, model, "
            "dimension, source_topic, source_partition, source_offset, event_time) "
            "VALUES ('n', 'old', array_fill(1, ARRAY[512])::vector, $1, '\\x00', 'm', 512, "
            "'t', 0, 0, now())",
            f"Order {SKU} shipped",
        )
        # Before 0006, lexical search says what to do.
        code, out, err = await cli("search", SKU, "--mode", "lexical", **_env(env))
        assert (code, out) == (3, "")
        assert "0006_lexical.sql" in err and "embedding-worker migrate" in err, err
        assert await migrate(conn, 512) == ["0006_lexical.sql"]
        assert [h.id for h in await lexical(conn, SKU)] == ["old"]
    finally:
        await conn.close()


async def test_a_configuration_name_is_never_pasted_as_sql(env: Env) -> None:
    conn = await asyncpg.connect(env.dsn)
    try:
        with pytest.raises(MigrationError, match="not a text search configuration name"):
            await migrate(conn, 4, text_search_config="simple'::regconfig; DROP TABLE x; --")
        with pytest.raises(asyncpg.UndefinedObjectError):
            await migrate(conn, 4, text_search_config="klingon")
    finally:
        await conn.close()


# --- the optional lexical index --------------------------------------------------------------


async def test_the_lexical_index_is_used_by_the_same_query_and_changes_no_answer(
    catalogue: Env,
) -> None:
    """Without it the words are computed per scanned row; `index create --lexical` stores them
    in a column with a GIN index that lexical search then uses, and `index drop --lexical`
    removes both; the answers never change."""
    base = ("search", QUERY, "--namespace", "shop", "--mode", "lexical", "-k", "10")
    before = await _json_lines(catalogue, *base)
    code, out, err = await cli("index", "status", "--lexical", **_env(catalogue))
    assert (code, out.strip()) == (0, f"no index {index.LEXICAL_NAME}: lexical search scans"), err

    code, out, err = await cli("index", "create", "--lexical", **_env(catalogue))
    assert code == 0 and index.LEXICAL_COLUMN in out and "valid" in out, err
    conn = await catalogue.connect()
    try:
        assert await index.has_lexical_column(conn)
        sql = await lexical_sql(conn)
        assert f"ts_rank({index.LEXICAL_COLUMN}, q, 1)" in sql  # ranks the stored words
        async with conn.transaction():
            await conn.execute("SET LOCAL enable_seqscan = off")  # 11 rows: force the choice
            # Every namespace: with one, the primary key (namespace, id) competes.
            plan = await conn.fetch(f"EXPLAIN {sql}", QUERY, None, None, None, 10)
    finally:
        await conn.close()
    assert index.LEXICAL_NAME in "\n".join(r[0] for r in plan)
    assert await _json_lines(catalogue, *base) == before
    # The worker keeps writing (both write paths name their columns); new rows have words.
    spare = {"id": "hp-9", "text": f"Spare ear cushions for {SKU}", "namespace": "shop"}
    high = await catalogue.produce([spare])
    async with running(catalogue.settings()):
        await catalogue.wait_for_offsets(high)
    assert "hp-9" in {h["id"] for h in await _json_lines(catalogue, *base)}
    code, out, err = await cli("index", "drop", "--lexical", **_env(catalogue))
    assert (code, out.strip()) == (
        0,
        f"dropped {index.LEXICAL_NAME} and {index.LEXICAL_COLUMN}",
    ), err
    conn = await catalogue.connect()
    try:
        assert not await index.has_lexical_column(conn)
    finally:
        await conn.close()
