"""A record the Kafka client cannot parse (a header name that is not UTF-8, as a librdkafka or
Java producer may send) is dead-lettered as `unreadable_record`; the worker moves on and loses
nothing else, through the real broker and Postgres."""

from __future__ import annotations

import json
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.record.util import calc_crc32c

from fakeapi import FakeEmbeddingServer
from tests.conftest import Env, dashscope, highest, migrate_db, running
from tests.integration.test_data_faults import _rows
from worker.events import DeadLetter, Reason, SourcePosition
from worker.tools.replay import SOURCE_UNREADABLE, UNREADABLE, Filters, Found, replay, scan

Header = tuple[str, bytes | None]
Rec = tuple[bytes | None, bytes | None, Sequence[Header]]

# A header name aiokafka's producer can encode, swapped for bytes that are not UTF-8 once the
# batch is built (same length, so only the CRC changes).
PLACEHOLDER = "name-\x7f"
NOT_UTF8 = b"name-\xff"
CRC_AT, CRC_FROM = 17, 21  # record batch v2: crc (uint32) at byte 17 covers bytes 21..end


async def produce_batch(env: Env, partition: int, records: Sequence[Rec]) -> list[int]:
    """Produce ``records`` to ``partition`` as ONE record batch, every header named
    ``PLACEHOLDER`` renamed to the invalid UTF-8 ``NOT_UTF8``; returns their offsets.

    aiokafka's producer encodes header names from str, so the batch is built by the producer's
    own batch builder and its bytes are changed before it is sent (CRC recomputed): what a
    producer that takes header names as bytes would send."""
    producer = AIOKafkaProducer(bootstrap_servers=env.stack.bootstrap, acks="all")
    await producer.start()
    try:
        batch = producer.create_batch()
        for key, value, headers in records:
            assert batch.append(key=key, value=value, timestamp=None, headers=list(headers))
        buffer = batch._build()  # the bytes that will be sent
        assert buffer.count(PLACEHOLDER.encode()) == sum(
            n == PLACEHOLDER for _, _, h in records for n, _ in h
        )
        patched = bytes(buffer).replace(PLACEHOLDER.encode(), NOT_UTF8)
        crc = calc_crc32c(memoryview(patched)[CRC_FROM:])
        buffer[:] = patched[:CRC_AT] + crc.to_bytes(4, "big") + patched[CRC_AT + 4 :]
        sent = await (await producer.send_batch(batch, env.topic, partition=partition))
        return [sent.offset + i for i in range(len(records))]
    finally:
        await producer.stop()


def _event(id: str) -> Rec:
    return (id.encode(), json.dumps({"id": id, "text": f"text of {id}"}).encode(), ())


BAD: Rec = (b"bad", json.dumps({"id": "bad", "text": "never read"}).encode(), [(PLACEHOLDER, b"v")])


async def test_an_unreadable_record_is_dead_lettered_and_nothing_else_is_lost(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    """Records before it in its batch, after its batch in its partition and in the other
    partitions are stored once; it is dead-lettered once with its position, and so is the
    record after it in its batch (aiokafka parses a batch in order, so cannot read past it);
    a restart goes on from after them; replay counts them as not replayable."""
    await migrate_db(env, 256)
    offsets = await produce_batch(env, 0, [_event("a0"), _event("a1"), BAD, _event("a2")])
    bad_offset = offsets[2]
    later = await produce_batch(env, 0, [_event("a3")])
    elsewhere = await produce_batch(env, 1, [_event("b0"), _event("b1")])
    others = await env.produce_records([(b"c0", json.dumps({"id": "c0", "text": "c"}).encode())])
    high = highest([*((0, o) for o in [*offsets, *later]), *((1, o) for o in elsewhere), *others])
    good = {"a0", "a1", "a3", "b0", "b1", "c0"}

    settings = env.settings(dashscope(fake_api))
    async with running(settings) as worker:
        await env.wait_for_offsets(high)
        assert worker.pipeline is not None
        stats = worker.pipeline.stats
        assert (stats.stored, stats.unchanged) == (len(good), 0)  # each once
        assert stats.dead_lettered == {"unreadable_record": 2}
    assert {i for _, i in await _rows(env)} == good
    assert await env.stored_offsets() == {p: h + 1 for p, h in high.items()}
    letters = await env.dead_letters(expected=2)
    assert [x["source"] for x in letters] == [
        {"topic": env.topic, "partition": 0, "offset": o, "timestamp_ms": None}
        for o in (bad_offset, bad_offset + 1)
    ]
    for letter in letters:
        assert letter["reason"] == "unreadable_record"
        assert "UnicodeDecodeError" in letter["message"]
        assert (letter["key_b64"], letter["value_b64"], letter["headers"]) == (None, None, [])

    # A restart goes on from after it: no second letter, the new record is stored.
    high = highest((0, o) for o in await produce_batch(env, 0, [_event("a4")]))
    async with running(settings) as worker:
        await env.wait_for_offsets(high)
        assert worker.pipeline is not None
        assert worker.pipeline.stats.dead_lettered == {}
        assert worker.pipeline.stats.stored == 1
    assert {i for _, i in await _rows(env)} == good | {"a4"}
    assert len(await env.dead_letters(expected=2)) == 2

    k = settings.kafka
    found = await scan(k, Filters(frozenset({Reason.UNREADABLE_RECORD})))
    result = await replay(k, found.letters, found.topic)
    assert (result.events, dict(result.skipped)) == (0, {UNREADABLE: 2})

    # A letter cut to fit its topic is replayed from its source: one whose source this client
    # cannot read (forged here at the record after the unreadable one) is not replayable either.
    cut = DeadLetter(
        reason=Reason.INVALID_JSON,
        message="forged",
        key_b64=None,
        value_b64="",
        value_truncated=True,
        value_size=10,
        value_sha256="0" * 64,
        source=SourcePosition(topic=env.topic, partition=0, offset=bad_offset + 1),
    )
    result = await replay(k, [Found(0, 0, cut)], found.topic)
    assert (result.events, dict(result.skipped)) == (0, {SOURCE_UNREADABLE: 1})
