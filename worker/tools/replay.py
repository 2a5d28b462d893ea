"""``embedding-worker dead-letters``: what was dead-lettered, and replaying it once fixed.

A dead letter carries the original key, value and headers and where the record came from
(``worker.events.DeadLetter``). This reads the dead-letter topic from the beginning up to
its end, keeps the letters that match the filters, and lists them or produces the original
records to the input topic again (tombstones included), each with its own headers plus a
``replayed-from`` header naming its letter (left off when the original filled the input
topic's size limit), and the original record's timestamp. Versions are
ordered by event time (the event's ``timestamp``, else the record's), so a replayed event is
applied unless a newer version of the same id was stored since it was first sent: a replay
never rolls a document back. Replay what was fixed (a reason, a namespace, a time), not
everything. A letter whose copy was cut to fit its topic is replayed from the original,
read again at its source offset and checked against the letter's SHA-256; if it is gone
(retention, compaction, a restarted in-memory broker) the letter is counted as not
replayable, with the reason.
"""

from __future__ import annotations

import asyncio
import base64
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import MessageSizeTooLargeError, OffsetOutOfRangeError
from aiokafka.structs import RecordMetadata
from pydantic import ValidationError

from worker.config import KafkaSettings
from worker.envelope import RECORD_OVERHEAD_BYTES, digest, headers_digest, headers_size
from worker.events import DeadLetter, Reason, SourcePosition
from worker.kafka.clients import at_high_water, common_options, make_producer, started
from worker.kafka.unreadable import UNREADABLE_ERRORS

REPLAYED_FROM = "replayed-from"


@dataclass(frozen=True)
class Filters:
    reasons: frozenset[Reason] = frozenset()
    namespace: str | None = None
    since: datetime | None = None

    def match(self, letter: DeadLetter) -> bool:
        return (
            (not self.reasons or letter.reason in self.reasons)
            and (self.namespace is None or letter.namespace == self.namespace)
            and (self.since is None or letter.failed_at >= self.since)
        )


@dataclass(frozen=True)
class Found:
    partition: int
    offset: int
    letter: DeadLetter

    @property
    def where(self) -> str:
        return f"{self.partition}/{self.offset}"


@dataclass
class Scan:
    topic: str
    letters: list[Found] = field(default_factory=list)  # the matching ones, in topic order
    total: int = 0  # every message read
    unreadable: int = 0  # not a dead letter of ours (another producer, an older format)

    @property
    def by_reason(self) -> Counter[str]:
        return Counter(f.letter.reason.value for f in self.letters)


async def scan(k: KafkaSettings, filters: Filters) -> Scan:
    """Every letter of the dead-letter topic up to its end, filtered, oldest first."""
    out = Scan(k.dlq_topic)
    consumer = AIOKafkaConsumer(
        enable_auto_commit=False, fetch_max_wait_ms=100, **common_options(k)
    )
    async with started(consumer):
        partitions = await partitions_of(k, k.dlq_topic)
        tps = [TopicPartition(k.dlq_topic, p) for p in partitions]
        if not tps:
            return out
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        # Until a fetch comes back empty with every partition at its high-water mark.
        while True:
            batch = await consumer.getmany(*tps, timeout_ms=250)
            for tp, messages in batch.items():
                for m in messages:
                    out.total += 1
                    try:
                        letter = DeadLetter.model_validate_json(m.value or b"")
                    except ValidationError:
                        out.unreadable += 1
                        continue
                    if filters.match(letter):
                        out.letters.append(Found(tp.partition, m.offset, letter))
            if not batch and await at_high_water(consumer, tps):
                break
    out.letters.sort(key=lambda f: (f.letter.failed_at, f.partition, f.offset))
    return out


async def partitions_of(k: KafkaSettings, topic: str) -> list[int]:
    """Asked of the cluster: an unassigned consumer's metadata has no partitions for a topic
    (Apache Kafka answers a metadata request for no topics with none)."""
    admin = AIOKafkaAdminClient(**common_options(k))
    try:
        await admin.start()
        # Listed first: a describe would create a missing topic on the embedded broker.
        if topic not in await admin.list_topics():
            return []
        (described,) = await admin.describe_topics([topic])
        return sorted(p["partition"] for p in described["partitions"])
    finally:
        await admin.close()


@dataclass(frozen=True)
class Original:
    """A record to produce again: the letter's copies, or the source record they were cut from."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]

    @property
    def size(self) -> int:
        return len(self.key or b"") + len(self.value or b"") + headers_size(self.headers)


@dataclass
class Replayed:
    events: int = 0  # produced to the input topic
    from_source: int = 0  # of which read again from their source offset (the copy was cut)
    skipped: Counter[str] = field(default_factory=Counter)  # not replayable, by why


OLD_TOMBSTONE = "tombstone in an older letter without its headers"
GONE = "original no longer at its source offset"
DIFFERS = "record at the source offset is not the original"
TOO_LARGE = "larger than the input topic takes"
UNREADABLE = "record this client cannot read (unreadable_record)"
SOURCE_UNREADABLE = "record at the source offset cannot be read by this client"


async def replay(k: KafkaSettings, letters: Sequence[Found], dlq_topic: str) -> Replayed:
    """Produce the letters' original records to the input topic again (acknowledged): the
    copies when whole, else the record read from its source topic/partition/offset, if it is
    still there and its SHA-256 matches the letter's."""
    out = Replayed()
    chosen: list[tuple[Found, Original]] = []
    cut = [f for f in letters if f.letter.cut]
    fetched = await _fetch(k, [f.letter.source for f in cut]) if cut else {}
    for f in letters:
        letter = f.letter
        if letter.reason is Reason.UNREADABLE_RECORD:  # no copies, and no way to read it
            out.skipped[UNREADABLE] += 1
            continue
        if not letter.cut:
            if letter.value_b64 is None and letter.headers_size is None:
                out.skipped[OLD_TOMBSTONE] += 1
                continue
            chosen.append((f, _copied(letter)))
            continue
        position = _position(letter.source)
        record = fetched.get(position)
        if position not in fetched:
            out.skipped[GONE] += 1
        elif record is None:
            out.skipped[SOURCE_UNREADABLE] += 1
        elif not _same(letter, record):
            out.skipped[DIFFERS] += 1
        else:
            out.from_source += 1
            chosen.append((f, record))
    if not chosen:
        return out
    largest = max(o.size for _, o in chosen)
    producer = make_producer(k, max_request_size=largest + RECORD_OVERHEAD_BYTES)
    async with started(producer):
        futures = []
        for f, original in chosen:
            origin = f"{dlq_topic}/{f.partition}/{f.offset}".encode()
            futures.append(await _send(producer, k.input_topic, f, original, origin))
        refused: list[tuple[Found, Original]] = []
        for (f, original), fut in zip(chosen, futures, strict=True):
            try:
                await fut
            except MessageSizeTooLargeError:
                refused.append((f, original))
        # An original that filled the topic's limit fits again without the marker header.
        for f, original in refused:
            try:
                await (await _send(producer, k.input_topic, f, original, None))
            except MessageSizeTooLargeError:
                out.skipped[TOO_LARGE] += 1
                if f.letter.cut:
                    out.from_source -= 1
    out.events = len(chosen) - out.skipped[TOO_LARGE]
    return out


async def _send(
    producer: AIOKafkaProducer,
    topic: str,
    found: Found,
    original: Original,
    origin: bytes | None,
) -> asyncio.Future[RecordMetadata]:
    """Queue ``original`` for ``topic`` with its own timestamp, marked ``replayed-from``
    ``origin`` unless None; the future resolves when the broker acknowledged it."""
    marker = [] if origin is None else [(REPLAYED_FROM, origin)]
    return await producer.send(  # type: ignore[no-any-return]
        topic,
        key=original.key,
        value=original.value,
        headers=[*original.headers, *marker],
        timestamp_ms=found.letter.source.timestamp_ms,
    )


def _copied(letter: DeadLetter) -> Original:
    return Original(
        key=_decoded(letter.key_b64),
        value=_decoded(letter.value_b64),
        headers=[(h.key, _decoded(h.value_b64)) for h in letter.headers],
    )


def _decoded(b64: str | None) -> bytes | None:
    return None if b64 is None else base64.b64decode(b64)


def _same(letter: DeadLetter, original: Original) -> bool:
    if letter.headers_size is None:  # an older letter: only the value's size and prefix
        copy = _decoded(letter.value_b64) or b""
        value = original.value or b""
        return len(value) == letter.value_size and value.startswith(copy)
    return (
        digest(original.key) == letter.key_sha256
        and digest(original.value) == letter.value_sha256
        and headers_digest(original.headers) == letter.headers_sha256
    )


Position = tuple[str, int, int]


def _position(source: SourcePosition) -> Position:
    return (source.topic, source.partition, source.offset)


async def _fetch(
    k: KafkaSettings, sources: Sequence[SourcePosition]
) -> dict[Position, Original | None]:
    """The records still at these positions (a missing one is simply absent, one the client
    cannot parse, or that shares a batch with such a record before it, is None)."""
    consumer = AIOKafkaConsumer(
        enable_auto_commit=False,
        auto_offset_reset="none",  # a position before the log's start is gone, not "latest"
        isolation_level=k.isolation_level,  # what the worker reads
        fetch_max_wait_ms=k.fetch_max_wait_ms,
        **common_options(k),
    )
    out: dict[Position, Original | None] = {}
    async with started(consumer):
        partitions = {t: await partitions_of(k, t) for t in {s.topic for s in sources}}
        for source in sources:
            position = _position(source)
            if position in out or source.partition not in partitions[source.topic]:
                continue
            tp = TopicPartition(source.topic, source.partition)
            consumer.assign([tp])
            consumer.seek(tp, source.offset)
            try:
                record = await _record_at(consumer, tp, source.offset)
            except UNREADABLE_ERRORS:
                out[position] = None
                continue
            if record is not None:
                out[position] = record
    return out


async def _record_at(
    consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int, seconds: float = 10.0
) -> Original | None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        try:
            batch = await consumer.getmany(tp, timeout_ms=500, max_records=1)
        except OffsetOutOfRangeError:
            return None
        for m in batch.get(tp, []):
            if m.offset != offset:  # compacted away: the next record came instead
                return None
            return Original(m.key, m.value, list(m.headers or ()))
        high = consumer.highwater(tp)
        if not batch and high is not None and offset >= high:
            return None
    return None
