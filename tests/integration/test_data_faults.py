"""Data must never stop the worker, nor freeze a document: far-future versions and texts the
provider refused, through the real broker and Postgres."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

from fakeapi import FakeEmbeddingServer
from tests.broker_limits import (
    UNLIMITED_BROKER_OVER_BYTES,
    Parts,
    sized,
    topic_max_message_bytes,
)
from tests.conftest import Env, dashscope, highest, migrate_db, running, wait_until
from tests.processes import cli
from worker.config import environment_for
from worker.envelope import dead_letter, digest, headers_digest
from worker.events import DeadLetter, Reason, SourcePosition
from worker.kafka.clients import AIOKAFKA_MAX_REQUEST_SIZE, make_producer
from worker.model import Record
from worker.sinks.deadletter import DeadLetterSink
from worker.tools.replay import OLD_TOMBSTONE, REPLAYED_FROM, Filters, replay, scan

Header = tuple[str, bytes | None]
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
    """Years ahead in the event's `timestamp`, or past the skew in the record's own time:
    dead-lettered, and the later upserts and tombstones of the same id still apply."""
    await migrate_db(env, 256)
    ahead = datetime.now(UTC) + timedelta(days=5 * 365)
    # A record's own time only 30 minutes ahead: Apache Kafka 4 refuses records stamped more
    # than an hour ahead (message.timestamp.after.max.ms); past the 300 s skew all the same.
    ahead_ms = int((datetime.now(UTC) + timedelta(minutes=30)).timestamp() * 1000)
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

        await wait_until(stored, 60, "the replayed event was not stored")
        assert pipeline.stats.dead_lettered == {}
    assert set(await _rows(env)) == {("news", "p0"), ("news", "p1")}


# --- records at the brokers' size limits --------------------------------------------------------

BUILDS: dict[str, tuple[Callable[[str, int], Parts], str]] = {
    # A tombstone whose key (its id) is as large as a record may be.
    "key": (lambda tag, n: (b"k" * n, None, []), "schema_violation"),
    "value": (
        lambda tag, n: (
            tag.encode(),
            _json({"id": tag, "text": "t", "metadata": {"b": "z" * n}}),
            [],
        ),
        "metadata_too_large",
    ),
    "one-header": (
        lambda tag, n: (tag.encode(), b"{not json", [("blob", b"h" * n)]),
        "invalid_json",
    ),
    "many-headers": (
        lambda tag, n: (
            tag.encode(),
            b"{not json",
            [*[("h", b"x" * 90)] * (n // 93), ("r", b"y" * (n % 93))],
        ),
        "invalid_json",
    ),
}


async def _limits(env: Env) -> dict[str, int]:
    """Record sizes just under the producer's limit and, where the broker takes more, just
    over it (at the broker's own limit, or 2 MiB on a broker that names none)."""
    broker = await topic_max_message_bytes(env.stack.bootstrap, env.topic)
    sizes = {"under": min(AIOKAFKA_MAX_REQUEST_SIZE, broker or AIOKAFKA_MAX_REQUEST_SIZE)}
    over = UNLIMITED_BROKER_OVER_BYTES if broker is None else broker
    if over > AIOKAFKA_MAX_REQUEST_SIZE:
        sizes["over"] = over
    return sizes


async def _read_input(env: Env) -> list[Any]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=env.stack.bootstrap, fetch_max_wait_ms=10)
    await consumer.start()
    out: list[Any] = []
    try:
        tps = [TopicPartition(env.topic, p) for p in range(4)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while True:
            batch = await consumer.getmany(*tps, timeout_ms=1000)
            out += [m for ms in batch.values() for m in ms]
            behind = [
                tp for tp in tps if await consumer.position(tp) < (consumer.highwater(tp) or 0)
            ]
            if not batch and not behind:
                return out
    finally:
        await consumer.stop()


async def test_records_at_the_size_limits_are_dead_lettered_within_the_topic_limit_and_replayed(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    """Key, value, one big header, many small headers: each just under the producer's limit
    and just over it. The worker keeps going, each is dead-lettered with its reason in a letter
    that fits the topic, and replay sends the exact original again, read from its source."""
    await migrate_db(env, 256)
    sizes = await _limits(env)
    originals: dict[str, Parts] = {}
    records: list[FullRecord] = []
    for name, (build, _) in BUILDS.items():
        for label, size in sizes.items():
            tag = f"{name}-{label}"
            originals[tag] = sized(size, partial(build, tag))
            records.append((*originals[tag], None))
            records.append(
                (f"good-{tag}".encode(), _json({"id": f"good-{tag}", "text": tag}), [], None)
            )
    largest = max(sizes.values())
    settings = env.settings(dashscope(fake_api))
    producer = make_producer(settings.kafka, max_request_size=largest + 1024)
    await producer.start()
    try:
        sent = [await producer.send(env.topic, key=k, value=v, headers=h) for k, v, h, _ in records]
        positions = [(m.partition, m.offset) for m in [await f for f in sent]]
    finally:
        await producer.stop()

    async with running(settings) as worker:
        await env.wait_for_offsets(highest(positions), seconds=120)
        assert worker.pipeline is not None and worker.pipeline.fatal is None
    assert set(await _rows(env)) == {("default", f"good-{tag}") for tag in originals}

    letters = await _dlq(env)
    assert len(letters) == len(originals)
    limit = settings.kafka.dlq_max_message_bytes
    for key, raw in letters:
        assert len(raw) + len(key or b"") < limit, "a dead letter must fit its topic"
    by_offset = {
        (x["source"]["partition"], x["source"]["offset"]): x
        for _, x in ((k, json.loads(v)) for k, v in letters)
    }
    for (name, (_, reason)), label in [(b, label) for b in BUILDS.items() for label in sizes]:
        tag = f"{name}-{label}"
        key, value, headers = originals[tag]
        position = positions[[r[:3] for r in records].index((key, value, headers))]
        letter = by_offset[position]
        assert letter["reason"] == reason, (tag, letter["message"])
        assert letter["key_truncated"] or letter["value_truncated"] or letter["headers_truncated"]
        assert letter["value_size"] == (None if value is None else len(value))
        assert letter["key_sha256"] == digest(key) and letter["value_sha256"] == digest(value)
        assert letter["headers_sha256"] == headers_digest(headers)

    found = await scan(settings.kafka, Filters())
    result = await replay(settings.kafka, found.letters, found.topic)
    assert (result.events, result.from_source, dict(result.skipped)) == (
        len(originals),
        len(originals),
        {},
    )
    everything = await _read_input(env)
    # Marked replayed-from, unless the marker would take the original over the topic's limit.
    first = set(positions)
    replayed = [m for m in everything if (m.partition, m.offset) not in first]
    first_sent = {(m.key, m.value, tuple(m.headers)): m.timestamp for m in everything}
    again = sorted(
        ((m.key, m.value, tuple(h for h in m.headers if h[0] != REPLAYED_FROM)), m.timestamp)
        for m in replayed
    )
    assert [parts for parts, _ in again] == sorted(
        (k, v, tuple(h)) for k, v, h in originals.values()
    ), "replay must send the exact original records"
    assert all(first_sent[parts] == timestamp for parts, timestamp in again)


async def _dlq(env: Env) -> list[tuple[bytes | None, bytes]]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=env.stack.bootstrap, fetch_max_wait_ms=10)
    await consumer.start()
    try:
        tp = TopicPartition(env.dlq, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        out: list[tuple[bytes | None, bytes]] = []
        while True:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            out += [(m.key, m.value) for m in batch.get(tp, []) if m.value is not None]
            if not batch and await consumer.position(tp) >= (consumer.highwater(tp) or 0):
                return out
    finally:
        await consumer.stop()


# --- the last line of defence, and originals that are gone ---------------------------------------


def _letter(env: Env, offset: int, value: bytes, topic: str | None = None) -> DeadLetter:
    record = Record(topic or env.topic, 0, offset, b"k", value, 1_700_000_000_000, (("a", b"b"),))
    return dead_letter(record, Reason.INVALID_JSON, "the value is not JSON")


async def _send(env: Env, max_request_size: int, *letters: DeadLetter) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=env.stack.bootstrap, max_request_size=max_request_size, acks="all"
    )
    await producer.start()
    try:
        await DeadLetterSink(producer, env.dlq).send([(b"k", x) for x in letters])
    finally:
        await producer.stop()


async def _accepts(env: Env, topic: str, size: int) -> bool:
    producer = AIOKafkaProducer(
        bootstrap_servers=env.stack.bootstrap, max_request_size=2 * size, acks="all"
    )
    await producer.start()
    try:
        await (await producer.send(topic, b"x" * size))
    except (MessageSizeTooLargeError, RecordListTooLargeError):
        return False
    finally:
        await producer.stop()
    return True


def _assert_stripped(letter: dict[str, Any], original: bytes) -> None:
    assert letter["value_truncated"] and letter["value_b64"] == "" and letter["headers"] == []
    assert letter["value_size"] == len(original) and letter["value_sha256"] == digest(original)
    assert letter["source"]["offset"] == 5


async def test_a_letter_refused_by_the_client_for_its_size_goes_without_copies(env: Env) -> None:
    """Should a letter still be too large for the producer, it is sent with its source
    position, sizes and hashes only, not raised (which would stop the worker)."""
    big, small = b"{" * 30_000, b"{"
    await _send(env, 20_000, _letter(env, 5, big), _letter(env, 6, small))
    letters = {x["source"]["offset"]: x for x in await env.dead_letters(expected=2)}
    _assert_stripped(letters[5], big)
    assert base64.b64decode(letters[6]["value_b64"]) == small and not letters[6]["value_truncated"]


async def test_a_letter_refused_by_the_broker_for_its_size_goes_without_copies(env: Env) -> None:
    """The same when the broker refuses it (MESSAGE_TOO_LARGE): a DLQ topic whose limit is
    below the worker's setting."""
    small_dlq, probe = f"{env.dlq}.small", f"{env.dlq}.probe"
    admin = AIOKafkaAdminClient(bootstrap_servers=env.stack.bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(name, 1, 1, topic_configs={"max.message.bytes": "20000"})
                for name in (small_dlq, probe)
            ]
        )
    finally:
        await admin.close()
    if await _accepts(env, probe, 30_000):
        pytest.skip("this broker (Tansu) keeps but does not enforce max.message.bytes")
    env.dlq = small_dlq
    big = b"{" * 30_000
    await _send(env, 10 * AIOKAFKA_MAX_REQUEST_SIZE, _letter(env, 5, big))
    [letter] = await env.dead_letters(expected=1)
    _assert_stripped(letter, big)


async def test_a_cut_letter_whose_original_is_gone_or_changed_is_not_replayed(env: Env) -> None:
    """Replay reads a cut letter's original from its source offset and checks its SHA-256:
    an original that is not there, or not the same, is counted with the reason."""
    [(partition, offset)] = await produce_full(env, [(b"k", b"{" * 50, [], None)])
    assert partition in range(4)
    big = b"{" * 30_000
    gone = _letter(env, 12_345, big).stripped()  # past the end of the source partition
    missing_topic = _letter(env, 0, big, topic=f"{env.topic}.deleted").stripped()
    other = (
        _letter(env, offset, big)
        .stripped()
        .model_copy(
            update={"source": SourcePosition(topic=env.topic, partition=partition, offset=offset)}
        )
    )  # the record there is another one
    await _send(env, AIOKAFKA_MAX_REQUEST_SIZE, gone, missing_topic, other)
    code, out, err = await cli(
        "dead-letters",
        "--replay",
        **environment_for({"kafka": env.stack.kafka_settings()}),
        EMBEDDING_WORKER_KAFKA__INPUT_TOPIC=env.topic,
        EMBEDDING_WORKER_KAFKA__DLQ_TOPIC=env.dlq,
    )
    assert code == 0, err
    assert (
        f"replayed 0 events to {env.topic}; 3 could not be "
        "(original no longer at its source offset: 2, "
        "record at the source offset is not the original: 1)"
    ) in out


async def test_letters_written_before_headers_were_kept_still_replay(env: Env) -> None:
    """Letters of the previous format (no headers, sizes or hashes): a value replays as before;
    a tombstone cannot (its namespace header was not kept) and is counted as such."""
    value = _json({"id": "a", "text": "an older letter"})
    source = {"topic": env.topic, "partition": 0, "offset": 3, "timestamp_ms": 1_700_000_000_000}
    common = {"reason": "metadata_too_large", "message": "m", "failed_at": "2026-11-24T03:20:44Z"}
    old = [
        {
            **common,
            "key_b64": "YQ==",
            "value_b64": base64.b64encode(value).decode(),
            "value_truncated": False,
            "value_size": len(value),
            "source": source,
        },
        {
            **common,
            "key_b64": "Yg==",
            "value_b64": None,
            "value_truncated": False,
            "value_size": None,
            "source": {**source, "offset": 4},
        },
    ]
    producer = make_producer(env.settings().kafka)
    await producer.start()
    try:
        for letter in old:
            await (await producer.send(env.dlq, json.dumps(letter).encode()))
    finally:
        await producer.stop()
    k = env.settings().kafka
    found = await scan(k, Filters())
    assert len(found.letters) == 2 and found.unreadable == 0
    result = await replay(k, found.letters, found.topic)
    assert (result.events, dict(result.skipped)) == (1, {OLD_TOMBSTONE: 1})
    [again] = [m for m in await _read_input(env) if m.value == value]
    assert again.key == b"a" and again.timestamp == 1_700_000_000_000


async def test_a_dead_lettered_tombstone_replays_with_its_namespace_header(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    """A producer clock ten minutes fast stamps a tombstone past the skew; once the skew is
    raised, replay sends it again with its headers, so it deletes in its own namespace."""
    await migrate_db(env, 256)
    fast_ms = int((datetime.now(UTC) + timedelta(minutes=10)).timestamp() * 1000)
    upsert = _json({"id": "t1", "namespace": "news", "text": "soon deleted"})
    settings = env.settings(dashscope(fake_api))
    high = highest(
        await produce_full(
            env, [(b"t1", upsert, [], None), (b"t1", None, [("namespace", b"news")], fast_ms)]
        )
    )
    async with running(settings):
        await env.wait_for_offsets(high)
    [letter] = await env.dead_letters(expected=1)
    assert (letter["reason"], letter["namespace"], letter["id"]) == (
        "timestamp_out_of_range",
        "news",
        "t1",
    )
    assert set(await _rows(env)) == {("news", "t1")}

    found = await scan(settings.kafka, Filters())
    assert (await replay(settings.kafka, found.letters, found.topic)).events == 1
    async with running(env.settings(dashscope(fake_api), max_clock_skew_s=3600)) as worker:
        assert worker.pipeline is not None
        pipeline = worker.pipeline

        async def deleted() -> bool:
            return pipeline.stats.deleted == 1

        await wait_until(deleted, 60, "the replayed tombstone was not applied")
    assert await _rows(env) == {}
