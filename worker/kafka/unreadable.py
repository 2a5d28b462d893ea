"""Records the Kafka client cannot parse: find each one, dead-letter it, move past it.

aiokafka parses fetched records lazily, inside ``getmany``, and offers no hook for a record it
cannot parse: a header name that is not UTF-8 (a librdkafka or Java producer may send one)
raises ``UnicodeDecodeError`` from its C extension and its pure-Python parser alike, a bad
CRC ``CorruptRecordException``. Such a record would stop the worker on every start, and the
failed call leaves the fetcher in a state no plain retry gets out of:

- the failing partition's position stays before the records of the batch it was reading, so
  every poll fetches the same batch and fails on it again;
- partitions drained earlier in the same call have moved their positions, but their records
  were lost with the exception.

Lenient parsing would need aiokafka's parser patched, C extension included, so instead the
pipeline catches the error and calls ``isolate``: it puts every partition back where the
pipeline has read to, polls each one that has records alone, and reads the one that fails one
record at a time up to the record that fails. The records read on the way are processed as
usual, in order; the consumer's position is then the unreadable record's offset, and it seeks
past it. The dead letter names the client's error and has no copies (this client cannot read
the record; ``dead-letters --replay`` counts it as not replayable).

aiokafka parses a record batch in order, the records before the one asked for included, so
the records after an unreadable one in its batch cannot be read by it either: each is found
and dead-lettered the same way, in turn. Likewise, the offset named is the one after the last
record read: the unreadable record's own, unless compaction removed the records just before
it (then each offset of that gap is dead-lettered in turn; nothing readable is skipped).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from aiokafka import TopicPartition
from aiokafka.errors import CorruptRecordException, IllegalStateError

from worker.envelope import MAX_MESSAGE_CHARS
from worker.events import DeadLetter, Reason, SourcePosition

# What aiokafka raises from ``getmany`` for a record it fetched but cannot parse.
UNREADABLE_ERRORS: tuple[type[Exception], ...] = (UnicodeDecodeError, CorruptRecordException)

Fetched = dict[TopicPartition, list[object]]


class Consumer(Protocol):
    """The part of ``AIOKafkaConsumer`` that isolation uses."""

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Fetched: ...
    async def position(self, partition: TopicPartition) -> int: ...
    def seek(self, partition: TopicPartition, offset: int) -> None: ...
    def highwater(self, partition: TopicPartition) -> int | None: ...
    def paused(self) -> set[TopicPartition]: ...


@dataclass(frozen=True)
class Unreadable:
    """A record at ``offset`` that the client failed to parse with ``error``."""

    topic: str
    partition: int
    offset: int
    error: str

    def letter(self) -> DeadLetter:
        message = (
            "the Kafka client cannot parse this record, or one before it in its record batch "
            f"(a batch is parsed in order): {self.error}; no copies (this client cannot read "
            "the record), only its source position"
        )
        return DeadLetter(
            reason=Reason.UNREADABLE_RECORD,
            message=message[:MAX_MESSAGE_CHARS],
            key_b64=None,
            value_b64=None,
            source=SourcePosition(topic=self.topic, partition=self.partition, offset=self.offset),
        )


async def isolate(
    consumer: Consumer,
    read_to: Mapping[TopicPartition, int],
    max_records: int,
    wait_ms: int = 5000,
) -> tuple[Fetched, list[Unreadable]]:
    """After ``getmany`` raised one of ``UNREADABLE_ERRORS``: the records each partition
    yields before its first unreadable one, and the unreadable records found (skipped).

    ``read_to`` is, per partition, the offset after the last record the caller has taken in
    hand: what the failed call drained is fetched again from there. A partition known to be
    at its high-water mark is not polled (nothing to wait for). Whatever is not found this
    time (records arrived since) fails the next poll again, and is found then. A partition
    revoked meanwhile is left out (its next owner reads it); the caller must drop what it
    gets for one that was revoked and assigned again meanwhile (its position was reset).
    """
    for tp, offset in read_to.items():
        with contextlib.suppress(IllegalStateError):  # revoked meanwhile
            if await consumer.position(tp) != offset:
                consumer.seek(tp, offset)
    fetched: Fetched = {}
    found: list[Unreadable] = []
    for tp in sorted(read_to, key=lambda t: (t.topic, t.partition)):
        try:
            records, unreadable = await _read(consumer, tp, max_records, wait_ms)
        except IllegalStateError:
            continue
        if records:
            fetched[tp] = records
        if unreadable is not None:
            found.append(unreadable)
    return fetched, found


async def _read(
    consumer: Consumer, tp: TopicPartition, max_records: int, wait_ms: int
) -> tuple[list[object], Unreadable | None]:
    """The partition alone, at most as far as the failed call read into it."""
    high = consumer.highwater(tp)
    if tp in consumer.paused() or (high is not None and await consumer.position(tp) >= high):
        return [], None
    try:
        got = await consumer.getmany(tp, timeout_ms=wait_ms, max_records=max_records)
    except UNREADABLE_ERRORS:
        # It failed within the first ``max_records`` records: read them one at a time.
        return await _step(consumer, tp, max_records, wait_ms)
    return got.get(tp, []), None


async def _step(
    consumer: Consumer, tp: TopicPartition, max_records: int, wait_ms: int
) -> tuple[list[object], Unreadable | None]:
    records: list[object] = []
    while len(records) < max_records:
        try:
            got = await consumer.getmany(tp, timeout_ms=wait_ms, max_records=1)
        except UNREADABLE_ERRORS as exc:
            offset = await consumer.position(tp)
            consumer.seek(tp, offset + 1)
            return records, Unreadable(tp.topic, tp.partition, offset, _describe(exc))
        if not got:
            break  # it read this time (a transient CRC error): nothing to skip
        records += got[tp]
    return records, None


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"
