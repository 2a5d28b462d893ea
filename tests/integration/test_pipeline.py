"""End to end on the embedded stack: Kafka -> worker -> fake DashScope -> Postgres."""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
from structlog.testing import capture_logs

from fakeapi import FakeEmbeddingServer, fake_vector
from tests.conftest import Env, dashscope, migrate_db, openai, running
from worker.embedding.providers import create_embedder

TOPICS = ("rockets", "bread", "markets", "storms", "trains", "football", "compilers", "vaccines")


def _event(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"doc-{i:05d}",
        "op": "upsert",
        "text": f"Item {i}: a short note about {TOPICS[i % len(TOPICS)]} number {i * 7919 % 1000}",
        "namespace": "news",
        "metadata": {"n": i},
        **extra,
    }


async def _rows(env: Env, sql: str = "SELECT * FROM embeddings") -> dict[str, Any]:
    conn = await env.connect()
    try:
        return {r["id"]: r for r in await conn.fetch(sql)}
    finally:
        await conn.close()


async def test_2000_events_each_id_stored_once_with_its_own_vector(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    """Shuffled answers prove placement by text_index; stats prove no batch exceeded 10."""
    fake_api.configure(shuffle=True)
    await migrate_db(env, 256)
    events = [_event(i) for i in range(2000)]
    high = await env.produce(events)
    assert len(high) == 4, "the ids should spread over all four partitions"

    async with running(env.settings(dashscope(fake_api))):
        await env.wait_for_offsets(high)

    rows = await _rows(env)
    assert len(rows) == 2000
    texts = {e["id"]: e["text"] for e in events}
    for doc_id, row in rows.items():
        expected = fake_vector(texts[doc_id], 256)
        assert np.allclose(row["embedding"].to_numpy(), expected, atol=1e-6), doc_id
        assert row["version"] == 1
        assert row["model"] == "text-embedding-v4" and row["dimension"] == 256
        assert json.loads(row["metadata"]) == {"n": int(doc_id.split("-")[1])}
    assert await env.stored_offsets() == {p: h + 1 for p, h in high.items()}
    assert await env.kafka_committed() == {p: h + 1 for p, h in high.items()}
    stats = fake_api.stats()
    assert stats["max_batch"] <= 10
    assert stats["texts"] == 2000, "each text is embedded exactly once"
    assert stats["by_status"] == {200: stats["requests"]}


async def test_openai_dialect_with_base64(env: Env, fake_api: FakeEmbeddingServer) -> None:
    await migrate_db(env, 128)
    events = [_event(i) for i in range(60)]
    high = await env.produce(events)
    async with running(env.settings(openai(fake_api, 128, max_texts_per_request=16))):
        await env.wait_for_offsets(high)
    rows = await _rows(env)
    assert len(rows) == 60
    for e in events:
        assert np.allclose(rows[e["id"]]["embedding"].to_numpy(), fake_vector(e["text"], 128))
    assert fake_api.stats()["max_batch"] <= 16


async def test_a_server_that_takes_fewer_texts_lowers_the_batch_size_once_and_loses_nothing(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    """An OpenAI-compatible server (not DashScope) gets 32 texts per request by default; this
    one takes 7 and says so in its 400. The worker lowers its batch size to 7 for good with one
    log line and sends the refused texts again, split: every event stored, none dead-lettered."""
    fake_api.configure(max_texts=7)
    await migrate_db(env, 128)
    events = [_event(i) for i in range(300)]
    high = await env.produce(events)
    settings = env.settings(openai(fake_api, 128))
    probe = create_embedder(settings.provider)  # the provider's own default
    assert probe.max_texts == 32
    await probe.close()
    with capture_logs() as logs:
        async with running(settings) as worker:
            await env.wait_for_offsets(high)
            assert worker.pipeline is not None
            stats = worker.pipeline.stats
            assert worker.pipeline.batcher.max_texts == worker.pipeline.stage.max_texts == 7
    rows = await _rows(env)
    assert len(rows) == 300
    for e in events:
        assert np.allclose(rows[e["id"]]["embedding"].to_numpy(), fake_vector(e["text"], 128))
    assert not stats.dead_lettered
    lowered = [e for e in logs if e["event"].startswith("provider takes fewer texts")]
    assert [(e["max_texts"], e["was"]) for e in lowered] == [(7, 32)]
    fake = fake_api.stats()
    assert fake["by_status"].get(400, 0) >= 1
    assert fake["texts"] == 300, "each text embedded once"


async def test_updates_deletes_and_late_older_events(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, 256)
    t = "2026-11-20T10:00:{:02d}Z".format
    phase1: list[dict[str, Any]] = [
        # A: newer update wins; an older event arriving later is ignored.
        {"id": "A", "text": "alpha one", "timestamp": t(1)},
        {"id": "A", "text": "alpha two", "timestamp": t(2)},
        {"id": "A", "text": "alpha zero", "timestamp": t(0)},
        # B: upsert then delete.
        {"id": "B", "text": "bravo", "timestamp": t(1)},
        {"id": "B", "op": "delete", "timestamp": t(2)},
        # C: a delete older than the stored row is ignored.
        {"id": "C", "text": "charlie", "timestamp": t(5)},
        {"id": "C", "op": "delete", "timestamp": t(3)},
        # D: an upsert older than a delete does not resurrect the row.
        {"id": "D", "op": "delete", "timestamp": t(6)},
        {"id": "D", "text": "delta", "timestamp": t(4)},
        # E: removed by a tombstone (null value) below.
        {"id": "E", "text": "echo"},
        # F: metadata changes later without a text change.
        {"id": "F", "text": "foxtrot", "metadata": {"v": 1}, "timestamp": t(1)},
    ]
    high = await env.produce(phase1)
    settings = env.settings(dashscope(fake_api))
    async with running(settings):
        await env.wait_for_offsets(high)
        texts_before = fake_api.stats()["texts"]
        await env.wait_for_offsets(await env.produce_raw([(b"E", None)]))
        update = {"id": "F", "text": "foxtrot", "metadata": {"v": 2}, "timestamp": t(9)}
        await env.wait_for_offsets(await env.produce([update]))

    rows = await _rows(env)
    assert sorted(rows) == ["A", "C", "F"]
    assert rows["A"]["content"] == "alpha two"
    assert np.allclose(rows["A"]["embedding"].to_numpy(), fake_vector("alpha two", 256))
    assert rows["C"]["content"] == "charlie"
    assert json.loads(rows["F"]["metadata"]) == {"v": 2}
    assert rows["F"]["version"] == 2
    assert fake_api.stats()["texts"] == texts_before, "unchanged text is not embedded again"


async def test_restart_and_forced_replay_apply_nothing_twice(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, 256)
    events = [_event(i) for i in range(300)]
    high = await env.produce(events)
    settings = env.settings(dashscope(fake_api))
    async with running(settings):
        await env.wait_for_offsets(high)
    sql = "SELECT id, version, updated_at, source_offset FROM embeddings"
    before = {k: tuple(r) for k, r in (await _rows(env, sql)).items()}
    texts = fake_api.stats()["texts"]

    # Restart from the stored offsets: only the new sentinel is processed.
    async with running(settings):
        await env.wait_for_offsets(await env.produce([_event(5000)]))
    after = {k: tuple(r) for k, r in (await _rows(env, sql)).items()}
    assert fake_api.stats()["texts"] == texts + 1
    assert {k: v for k, v in after.items() if k != "doc-05000"} == before

    # Forced replay from offset 0: every event is read again, nothing changes, no API call.
    conn = await env.connect()
    await conn.execute("DELETE FROM consumer_offsets")
    await conn.close()
    async with running(settings) as worker:
        await env.wait_for_offsets(await env.produce([_event(5001)]))
        assert worker.pipeline is not None
        assert worker.pipeline.stats.consumed == 302
        assert worker.pipeline.stats.unchanged == 301
    replayed = {k: tuple(r) for k, r in (await _rows(env, sql)).items()}
    assert fake_api.stats()["texts"] == texts + 2
    assert {k: v for k, v in replayed.items() if k != "doc-05001"} == after


async def test_malformed_events_are_dead_lettered_with_reasons(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, 256)
    good = [_event(i) for i in range(20)]
    bad: list[tuple[bytes | None, bytes | None, str]] = [
        (b"x1", b'{"id": "x1", "text": "caf\xe9"}', "invalid_utf8"),
        (b"x2", b'{"id": "x2", "text": ', "invalid_json"),
        (b"x3", b'["not", "an", "object"]', "schema_violation"),
        (b"x4", b'{"text": "no id"}', "schema_violation"),
        (b"x5", b'{"id": "x5", "op": "replace", "text": "t"}', "schema_violation"),
        (b"x6", b'{"id": "x6", "text": ""}', "empty_text"),
        (b"x7", b'{"id": "x7", "text": "   \\n "}', "empty_text"),
        (b"x8", b'{"id": "x8", "text": "nul \\u0000 inside"}', "nul_byte"),
        (b"other", b'{"id": "x9", "text": "key differs"}', "key_mismatch"),
        (
            b"x10",
            json.dumps({"id": "x10", "text": "t", "metadata": {"b": "y" * 900}}).encode(),
            "metadata_too_large",
        ),
        (b"x11", json.dumps({"id": "x11", "text": "long " * 400}).encode(), "text_too_long"),
        (b"", None, "schema_violation"),  # a tombstone without an id
        # Valid to Python, refused by Postgres: must be dead letters, not a stopped worker.
        (b"x12", b'{"id": "x12", "text": "t", "metadata": {"v": NaN}}', "invalid_json"),
        (b"x13", b'{"id": "x13", "text": "t", "metadata": {"v": 1e400}}', "invalid_json"),
        (
            b"x14",
            b'{"id": "x14", "text": "t", "timestamp": "0001-01-01T00:00:00+01:00"}',
            "schema_violation",
        ),
        (
            "\U0001f600".encode() * 300,
            json.dumps({"id": "\U0001f600" * 300, "text": "t"}).encode(),
            "schema_violation",
        ),  # 1,200-byte id: too big for the primary key
        (b"k" * 3000, None, "schema_violation"),  # tombstone with an oversized key
        (
            b"x15",
            json.dumps({"id": "x15", "text": "t", "metadata": {"b": "z" * 900_000}}).encode(),
            "metadata_too_large",
        ),  # the dead letter itself must fit the topic
    ]
    records: list[tuple[bytes | None, bytes | None]] = []
    for i, e in enumerate(good):
        records.append((e["id"].encode(), json.dumps(e).encode()))
        if i < len(bad):
            records.append(bad[i][:2])
    high = await env.produce_raw(records)
    settings = env.settings(
        dashscope(fake_api, max_tokens_per_text=200),
        oversize_policy="reject",
        max_metadata_bytes=500,
    )
    async with running(settings):
        await env.wait_for_offsets(high)
        letters = await env.dead_letters(expected=len(bad))
    assert len(letters) == len(bad)

    def raw(b64: str | None) -> bytes | None:
        return None if b64 is None else base64.b64decode(b64)

    assert len({(x["source"]["partition"], x["source"]["offset"]) for x in letters}) == len(bad)
    by_record = {(raw(x["key_b64"]), raw(x["value_b64"])): x for x in letters}
    for key, value, reason in bad:
        if value is not None and len(value) > 900_000:  # cut to fit the dead-letter topic
            (letter,) = [x for x in letters if x["value_truncated"]]
            assert letter["value_size"] == len(value)
            assert value.startswith(raw(letter["value_b64"]) or b"-")
        else:
            letter = by_record[(key if key is None else key[:4096], value)]
        assert letter["reason"] == reason, (value, letter)
        assert letter["message"]
        assert letter["source"]["topic"] == env.topic
        assert letter["source"]["offset"] >= 0 and letter["failed_at"]
    rows = await _rows(env)
    assert sorted(rows) == sorted(e["id"] for e in good)


async def test_poison_item_is_isolated_from_its_batch(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    fake_api.configure(poison=["FORBIDDEN"])
    await migrate_db(env, 256)
    events = [_event(i) for i in range(10)]
    events[4]["text"] = "this text is FORBIDDEN by the content inspection"
    high = await env.produce(events, keys=False)
    async with running(env.settings(dashscope(fake_api), batch={"linger_ms": 500})):
        await env.wait_for_offsets(high)
        letters = await env.dead_letters(expected=1)
    assert len(letters) == 1
    assert letters[0]["reason"] == "provider_rejected"
    assert letters[0]["provider_code"] == "DataInspectionFailed"
    rows = await _rows(env)
    assert sorted(rows) == sorted(e["id"] for i, e in enumerate(events) if i != 4)


async def test_oversize_text_is_truncated_by_default(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, 256)
    long_text = "word " * 2000
    high = await env.produce([{"id": "long", "text": long_text}])
    settings = env.settings(dashscope(fake_api, max_tokens_per_text=300))
    async with running(settings):
        await env.wait_for_offsets(high)
    row = (await _rows(env))["long"]
    assert row["truncated"] is True
    assert len(row["content"].encode()) <= 900
    assert np.allclose(row["embedding"].to_numpy(), fake_vector(row["content"], 256))
