"""A consumer whose offsets live in Postgres beside what it applies (moderation decisions,
interactions): exactly once, apart from the pipeline's consumer.

It reads one fetch at a time in its own group. On assignment each partition is sought to
the offset stored there, so a crash between the read and the commit reads the fetch again
and one after it never applies it twice; a fetch read across a rebalance is dropped and the
partitions sought back (``stale``). Records the client cannot parse are isolated and
dead-lettered like bad ones. A subclass parses, dead-letters and stores in ``handle``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from worker.config import Settings
from worker.envelope import envelope_budget
from worker.events import DeadLetter
from worker.kafka.unreadable import UNREADABLE_ERRORS, isolate
from worker.model import Record
from worker.sinks import postgres as store
from worker.sinks.deadletter import DeadLetterSink
from worker.sinks.store import RunPg

if TYPE_CHECKING:
    from worker.ops.tracing import Tracing

log = structlog.get_logger(__name__)

Letters = list[tuple[bytes | None, DeadLetter]]


@dataclass
class ConsumerStats:
    consumed: int = 0
    applied: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)


class SideConsumer(ConsumerRebalanceListener):  # type: ignore[misc]
    STUCK_AFTER_S = 60.0

    def __init__(
        self,
        kind: str,
        settings: Settings,
        consumer: AIOKafkaConsumer,
        dead_letters: DeadLetterSink,
        pg: RunPg,
        topic: str,
        stats: ConsumerStats,
    ) -> None:
        self.kind = kind  # "decisions", "interactions": names the logs and readiness checks
        self.settings = settings
        self.topic = topic
        self.group = f"{settings.kafka.group_id}.{kind}"
        self.consumer = consumer
        self.dead_letters = dead_letters
        self.pg = pg
        self.stats = stats
        self.budget = envelope_budget(settings.kafka.dlq_max_message_bytes)
        self.running = False
        self.last_poll = time.monotonic()
        self.fatal: BaseException | None = None
        # Bumped by every assignment: a fetch from before one is dropped (its partitions
        # were sought back to their stored offsets and are read again).
        self._generation = 0
        self._read_to: dict[TopicPartition, int] = {}
        # Set by the app when tracing is on: each record continues its trace, each fetch
        # applied is a span linking them.
        self.tracing: Tracing | None = None

    def checks(self) -> dict[str, bool]:
        return {
            f"{self.kind}_consuming": self.running,
            f"{self.kind}_polling": time.monotonic() - self.last_poll < self.STUCK_AFTER_S,
        }

    async def handle(
        self, records: list[Record], unreadable: list[DeadLetter], generation: int
    ) -> None:
        """One fetch: dead-letter what cannot be applied, store the rest with the offsets."""
        raise NotImplementedError

    async def _handle(
        self, records: list[Record], unreadable: list[DeadLetter], generation: int
    ) -> None:
        tracing = self.tracing
        if tracing is None:
            await self.handle(records, unreadable, generation)
            return
        events = [
            tracing.received(r.topic, r.partition, r.offset, r.headers, self.group) for r in records
        ]
        with tracing.applying(self.kind, self.topic, events):
            await self.handle(records, unreadable, generation)

    # ---- rebalance -------------------------------------------------------------------

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        try:
            await self._assign(assigned)
        except Exception as exc:  # aiokafka would swallow it and leave the partitions unread
            log.exception(f"{self.kind} partition assignment failed; stopping")
            self.fatal = exc

    async def _assign(self, assigned: list[TopicPartition]) -> None:
        self._generation += 1
        stored = await self.pg(
            f"load {self.kind} offsets", lambda c: store.load_offsets(c, self.group, self.topic)
        )
        for tp in assigned:
            position = stored.get(tp.partition)
            if position is not None:
                self.consumer.seek(tp, position)
            elif self.settings.kafka.auto_offset_reset == "earliest":
                await self.consumer.seek_to_beginning(tp)
            else:
                await self.consumer.seek_to_end(tp)
            self._read_to[tp] = await self.consumer.position(tp)
        log.info(
            f"{self.kind} partitions assigned", partitions=sorted(t.partition for t in assigned)
        )

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self._generation += 1
        for tp in revoked:
            self._read_to.pop(tp, None)

    # ---- the loop --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self.running = True
        try:
            while not stop.is_set() and self.fatal is None:
                self.last_poll = time.monotonic()
                generation = self._generation
                fetched, unreadable = await self._poll()
                records = [
                    Record.of(tp.topic, tp.partition, m)
                    for tp in sorted(fetched, key=lambda t: (t.topic, t.partition))
                    for m in fetched[tp]
                ]
                if self.stale(generation):
                    continue  # assigned again during the poll: keep nothing of it
                if records or unreadable:
                    await self._handle(records, unreadable, generation)
        finally:
            self.running = False
        if self.fatal is not None:
            raise self.fatal

    async def _poll(self) -> tuple[dict[TopicPartition, list[object]], list[DeadLetter]]:
        try:
            fetched = await self.consumer.getmany(
                timeout_ms=200, max_records=self.settings.kafka.max_poll_records
            )
            return fetched, []
        except UNREADABLE_ERRORS as exc:
            log.warning(
                f"a fetched {self.kind} record cannot be parsed; isolating it", error=repr(exc)
            )
            found, bad = await isolate(
                self.consumer, dict(self._read_to), self.settings.kafka.max_poll_records
            )
            return found, [u.letter() for u in bad]

    # ---- for handle() ----------------------------------------------------------------

    async def send_letters(self, letters: Letters) -> None:
        """Dead letters in source order, acknowledged before the offsets move past them."""
        if not letters:
            return
        letters.sort(key=lambda kl: (kl[1].source.partition, kl[1].source.offset))
        await self.dead_letters.send(letters)
        for _, letter in letters:
            self.stats.dead_lettered[letter.reason.value] += 1

    @staticmethod
    def offsets_after(
        records: Sequence[Record], unreadable: Sequence[DeadLetter]
    ) -> dict[tuple[str, int], int]:
        """The next offset to read per (topic, partition) once this fetch is stored."""
        offsets: dict[tuple[str, int], int] = {}
        positions = [(r.topic, r.partition, r.offset) for r in records]
        positions += [(u.source.topic, u.source.partition, u.source.offset) for u in unreadable]
        for topic, partition, offset in positions:
            key = (topic, partition)
            offsets[key] = max(offsets.get(key, 0), offset + 1)
        return offsets

    def stale(self, generation: int) -> bool:
        """Assigned again since ``generation``: back to the stored offsets, drop the fetch."""
        if generation == self._generation:
            return False
        for tp, offset in self._read_to.items():
            if tp in self.consumer.assignment():
                self.consumer.seek(tp, offset)
        return True

    def stored(self, offsets: dict[tuple[str, int], int], fetched: int, applied: int) -> None:
        """Account for a fetch whose rows and offsets are committed."""
        for (topic, partition), offset in offsets.items():
            tp = TopicPartition(topic, partition)
            if tp in self._read_to:  # still ours
                self._read_to[tp] = max(offset, self._read_to[tp])
        self.stats.consumed += fetched
        self.stats.applied += applied

    async def lookup_with_grace(
        self,
        what: str,
        lookup: Callable[..., Awaitable[dict[Any, Any]]],
        wanted: Sequence[tuple[Any, int | None]],
        grace_s: float,
    ) -> dict[Any, Any]:
        """``lookup(conn, keys=...)`` for (key, record time) pairs; a key not found yet is
        looked up again once, when its record is ``grace_s`` old (its row may be on its way:
        a result is published before its row commits)."""
        keys = [k for k, _ in wanted]
        found = await self.pg(what, partial(lookup, keys=keys))
        grace_ms, now_ms = grace_s * 1000, time.time() * 1000
        young = [t for k, t in wanted if k not in found and t is not None]
        wait_ms = max((t + grace_ms - now_ms for t in young), default=0.0)
        if wait_ms > 0:
            await asyncio.sleep(min(wait_ms, grace_ms) / 1000)
            missing = [k for k in keys if k not in found]
            found |= await self.pg(what, partial(lookup, keys=missing))
        return found
