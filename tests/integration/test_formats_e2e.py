"""Input formats end to end: a worker consumes Debezium change events and binary CloudEvents
from the broker and stores what they hold (the decoding itself: tests/unit/test_formats.py)."""

from __future__ import annotations

import json

from fakeapi import FakeEmbeddingServer
from tests.conftest import Env, dashscope, migrate_db, running
from tests.unit.test_formats import PRODUCT, debezium


async def test_a_worker_consumes_debezium_changes(env: Env, fake_api: FakeEmbeddingServer) -> None:
    """Snapshot, update, delete then tombstone, and a truncate: stored rows, one dead
    letter, and every offset settled."""
    await migrate_db(env, 64)
    key = json.dumps({"sku": 7}).encode()
    other = {**PRODUCT, "sku": 8, "name": "Toaster", "description": "Two slots"}
    renamed = {**PRODUCT, "name": "Kettle 2"}
    records: list[tuple[bytes | None, bytes | None]] = [
        (key, json.dumps(debezium("r", after=PRODUCT)).encode()),
        (b'{"sku": 8}', json.dumps(debezium("c", after=other)).encode()),
        (key, json.dumps(debezium("u", before=PRODUCT, after=renamed)).encode()),
        (b'{"sku": 8}', json.dumps(debezium("d", before=other)).encode()),
        (b'{"sku": 8}', None),
        (None, json.dumps(debezium("t")).encode()),
    ]
    # Later source times for later changes, as a database gives them.
    for i, (k, v) in enumerate(records):
        if v is not None:
            event = json.loads(v)
            event["payload"]["source"]["ts_ms"] += i
            records[i] = (k, json.dumps(event).encode())
    high = await env.produce_raw(records)
    fields = {"id": "sku", "text": ["name", "description"], "namespace": "shop"}
    settings = env.settings(dashscope(fake_api, 64), input={"format": "debezium", "fields": fields})
    async with running(settings):
        await env.wait_for_offsets(high)
        [dead] = await env.dead_letters(1)
    conn = await env.connect()
    try:
        rows = await conn.fetch("SELECT namespace, id, content FROM embeddings")
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [("eu", "7", "Kettle 2\n\nSteel kettle, 1.7 l")]
    assert dead["reason"] == "schema_violation" and "'t'" in dead["message"]


async def test_a_worker_consumes_binary_cloudevents(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, 64)
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"e-1"),
        ("ce_source", b"/cms"),
        ("ce_type", b"article"),
    ]
    high = await env.produce_raw(
        [
            (b"p-1", json.dumps({"id": "a-1", "text": "first"}).encode(), headers),
            (b"p-1", json.dumps({"id": "a-2", "text": "second"}).encode(), headers),
            (b"p-1", json.dumps({"id": "a-3", "text": "no envelope"}).encode()),
        ]
    )
    settings = env.settings(dashscope(fake_api, 64), input={"format": "cloudevents"})
    async with running(settings):
        await env.wait_for_offsets(high)
        [dead] = await env.dead_letters(1)
    conn = await env.connect()
    try:
        rows = await conn.fetch("SELECT id, metadata FROM embeddings ORDER BY id")
    finally:
        await conn.close()
    assert [r["id"] for r in rows] == ["a-1", "a-2"]
    assert json.loads(rows[0]["metadata"])["cloudevent"]["type"] == "article"
    assert dead["reason"] == "schema_violation" and "CloudEvent 1.0" in dead["message"]
