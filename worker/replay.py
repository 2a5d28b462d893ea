"""``embedding-worker dead-letters``: what was dead-lettered, and replaying it once fixed.

A dead letter carries the original key and value and where the event came from
(``worker.events.DeadLetter``). This reads the dead-letter topic from the beginning up to
its end, keeps the letters that match the filters, and lists them or
produces the original events to the input topic again, each with a ``replayed-from``
header naming its letter and the original record's timestamp. Versions are ordered by event
time (the event's ``timestamp``, else the record's), so a replayed event is applied unless a
newer version of the same id was stored since it was first sent: a replay never rolls a
document back. Replay what was fixed (a reason, a namespace, a time), not everything.
Letters whose value was cut to fit the topic, and tombstones, are counted but cannot be
replayed.
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import ValidationError

from worker.config import KafkaSettings
from worker.events import DeadLetter, Reason
from worker.kafka import common_options, make_producer

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

    @property
    def replayable(self) -> bool:
        return self.letter.value_b64 is not None and not self.letter.value_truncated


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
    consumer = AIOKafkaConsumer(enable_auto_commit=False, **common_options(k))
    await consumer.start()
    out = Scan(k.dlq_topic)
    try:
        partitions = await _partitions(k, k.dlq_topic)
        tps = [TopicPartition(k.dlq_topic, p) for p in partitions]
        if not tps:
            return out
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        # Until a fetch comes back empty with every partition at its high-water mark (the
        # mark a fetch reports; end_offsets() is wrong on the embedded broker, DESIGN.md).
        while True:
            batch = await consumer.getmany(*tps, timeout_ms=1000)
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
            if not batch:
                behind = [
                    tp for tp in tps if await consumer.position(tp) < (consumer.highwater(tp) or 0)
                ]
                if not behind:
                    break
    finally:
        await consumer.stop()
    out.letters.sort(key=lambda f: (f.letter.failed_at, f.partition, f.offset))
    return out


async def _partitions(k: KafkaSettings, topic: str) -> list[int]:
    """Asked of the cluster: an unassigned consumer's metadata has no partitions for a topic
    (Apache Kafka answers a metadata request for no topics with none)."""
    admin = AIOKafkaAdminClient(**common_options(k))
    await admin.start()
    try:
        # Listed first: a describe would create a missing topic on the embedded broker.
        if topic not in await admin.list_topics():
            return []
        (described,) = await admin.describe_topics([topic])
        return sorted(p["partition"] for p in described["partitions"])
    finally:
        await admin.close()


async def replay(k: KafkaSettings, letters: Sequence[Found], dlq_topic: str) -> int:
    """Produce the replayable letters' original events to the input topic (acknowledged)."""
    chosen = [f for f in letters if f.replayable]
    producer = make_producer(k)
    await producer.start()
    try:
        futures = []
        for f in chosen:
            value = base64.b64decode(f.letter.value_b64 or "")
            key = base64.b64decode(f.letter.key_b64) if f.letter.key_b64 is not None else None
            origin = f"{dlq_topic}/{f.partition}/{f.offset}".encode()
            futures.append(
                await producer.send(
                    k.input_topic,
                    key=key,
                    value=value,
                    headers=[(REPLAYED_FROM, origin)],
                    timestamp_ms=f.letter.source.timestamp_ms,
                )
            )
        for fut in futures:
            await fut
    finally:
        await producer.stop()
    return len(chosen)
