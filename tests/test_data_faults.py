"""Data must never stop the worker, nor freeze a document: far-future versions and texts the
provider refused, through the real broker and Postgres."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from fakeapi import FakeEmbeddingServer
from tests.conftest import Env, dashscope, highest, migrate_db, running
from worker.events import Reason
from worker.kafka import make_producer
from worker.replay import Filters, replay, scan

Header = tuple[str, bytes]
FullRecord = tuple[bytes | None, bytes | None, Sequence[Header], int | None]


def _json(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


async def produce_full(env: Env, records: Sequence[FullRecord]) -> list[tuple[int, int]]:
    """Produce (key, value, headers, timestamp_ms) in order; each one's (partition, offset)."""
    producer = make_producer(env.settings().kafka)
    await producer.start()
    try:
        futures = [
            await producer.send(env.topic, key=k, value=v, headers=list(h), timestamp_ms=t)
            for k, v, h, t in records
        ]
        return [(m.partition, m.offset) for m in [await f for f in futures]]
    finally:
        await producer.stop()


async def _rows(env: Env) -> dict[tuple[str, str], str]:
    conn = await env.connect()
    try:
        rows = await conn.fetch("SELECT namespace, id, content FROM embeddings")
    finally:
        await conn.close()
    return {(r["namespace"], r["id"]): r["content"] for r in rows}


async def test_a_far_future_version_does_not_freeze_its_document(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    """Years ahead, in the event's `timestamp` or in the record's own time: dead-lettered, and
    the later upserts and tombstones of the same id still apply."""
    await migrate_db(env, 256)
    ahead = datetime.now(UTC) + timedelta(days=5 * 365)
    ahead_ms = int(ahead.timestamp() * 1000)
    first: list[FullRecord] = [
        (b"doc", _json({"id": "doc", "text": "the first version"}), (), None),
        (
            b"doc",
            _json({"id": "doc", "text": "stamped ahead", "timestamp": ahead.isoformat()}),
            (),
            None,
        ),
        (b"doc", _json({"id": "doc", "text": "the second version"}), (), None),
        (b"late", _json({"id": "late", "text": "record stamped ahead"}), (), ahead_ms),
        (b"late", _json({"id": "late", "text": "the late id's version"}), (), None),
        (b"gone", _json({"id": "gone", "text": "to be deleted"}), (), None),
        (b"gone", None, (), ahead_ms),  # a tombstone stamped ahead
        (b"gone", _json({"id": "gone", "text": "deleted later"}), (), None),
    ]
    settings = env.settings(dashscope(fake_api))
    high = highest(await produce_full(env, first))
    async with running(settings):
        await env.wait_for_offsets(high)
    assert await _rows(env) == {
        ("default", "doc"): "the second version",
        ("default", "late"): "the late id's version",
        ("default", "gone"): "deleted later",
    }
    letters = await env.dead_letters(expected=3)
    assert sorted((x["reason"], x["id"]) for x in letters) == [
        ("timestamp_out_of_range", "doc"),
        ("timestamp_out_of_range", "gone"),
        ("timestamp_out_of_range", "late"),
    ]
    high = highest(await produce_full(env, [(b"doc", None, (), None), (b"gone", None, (), None)]))
    async with running(settings):
        await env.wait_for_offsets(high)
    assert await _rows(env) == {("default", "late"): "the late id's version"}


async def test_a_text_the_provider_refused_is_replayed_and_stored_once_allowed(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    """The letter carries the record the change came from (key, value, headers, time), so
    `dead-letters --replay` sends it again as it was."""
    fake_api.configure(poison=["FORBIDDEN"])
    await migrate_db(env, 256)
    refused = _json({"id": "p1", "namespace": "news", "text": "FORBIDDEN until the policy changes"})
    written = int((datetime.now(UTC) - timedelta(minutes=3)).timestamp() * 1000)
    records: list[FullRecord] = [
        (b"p0", _json({"id": "p0", "namespace": "news", "text": "an ordinary text"}), (), None),
        (b"p1", refused, [("trace", b"t-42")], written),
    ]
    settings = env.settings(dashscope(fake_api))
    high = highest(await produce_full(env, records))
    async with running(settings):
        await env.wait_for_offsets(high)
    [letter] = await env.dead_letters(expected=1)
    assert (letter["reason"], letter["namespace"], letter["id"]) == (
        "provider_rejected",
        "news",
        "p1",
    )
    assert base64.b64decode(letter["key_b64"]) == b"p1"
    assert base64.b64decode(letter["value_b64"]) == refused
    assert letter["source"]["timestamp_ms"] == written
    assert [(h["key"], base64.b64decode(h["value_b64"])) for h in letter["headers"]] == [
        ("trace", b"t-42")
    ]

    k = settings.kafka
    found = await scan(k, Filters(frozenset({Reason.PROVIDER_REJECTED})))
    result = await replay(k, found.letters, found.topic)
    assert result.events == 1 and not result.skipped
    fake_api.configure(poison=[])
    async with running(settings) as worker:
        assert worker.pipeline is not None
        pipeline = worker.pipeline

        async def stored() -> bool:
            return ("news", "p1") in await _rows(env)

        from tests.conftest import wait_until

        await wait_until(stored, 60, "the replayed event was not stored")
        assert pipeline.stats.dead_lettered == {}
    assert set(await _rows(env)) == {("news", "p0"), ("news", "p1")}
