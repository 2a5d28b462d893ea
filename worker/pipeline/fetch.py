"""Fetch: one poll of the consumer, with what a poll can meet on the way.

A record the client cannot parse is isolated (``worker.kafka.unreadable``) instead of stopping
the partition; the schemas a schema-registry format names are fetched before the records are
decoded; offsets that hold no record (transaction markers) are found so they can be settled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from worker.config import KafkaSettings
from worker.kafka.unreadable import UNREADABLE_ERRORS, Unreadable, isolate
from worker.model import Settled
from worker.pipeline.offsets import TP, OffsetTracker
from worker.pipeline.registry import Schemas

log = structlog.get_logger(__name__)


@dataclass
class Fetched:
    """The records of one fetch by partition, and the ones the client could not parse."""

    batches: dict[TopicPartition, list[object]] = field(default_factory=dict)
    unreadable: Sequence[Unreadable] = ()


class Fetcher:
    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        tracker: OffsetTracker,
        kafka: KafkaSettings,
        schemas: Schemas | None,
        revoking: set[TP],
    ) -> None:
        self.consumer = consumer
        self.tracker = tracker
        self.max_records = kafka.max_poll_records
        self.schemas = schemas
        # Partitions being revoked (shared with the runner): their records are not taken.
        self.revoking = revoking

    async def fetch(self, timeout_ms: int, stop: asyncio.Event) -> Fetched | None:
        """One poll; None when a stop came while waiting for the schema registry (nothing of
        the fetch was tracked: it is read again)."""
        fetched = await self._poll(timeout_ms)
        if self.schemas is None:
            return fetched
        return await self._with_schemas(self.schemas, fetched, stop)

    async def _poll(self, timeout_ms: int) -> Fetched:
        try:
            batches = await self.consumer.getmany(
                timeout_ms=timeout_ms, max_records=self.max_records
            )
        except UNREADABLE_ERRORS as exc:
            log.warning("a fetched record cannot be parsed; isolating it", error=repr(exc))
            return await self.isolate()
        return Fetched(batches)

    async def isolate(self) -> Fetched:
        """``isolate`` from where each partition was read to. A partition assigned again
        meanwhile (a rebalance) keeps nothing of it and goes back to its new start."""
        tps = {(tp.topic, tp.partition): tp for tp in self.consumer.assignment()}
        before = {key: self.tracker.epoch(key) for key in tps}
        read_to = {
            tp: offset
            for key, tp in tps.items()
            if (offset := self.tracker.read_to(key)) is not None
        }
        fetched, found = await isolate(self.consumer, read_to, self.max_records)
        moved = {key for key, epoch in before.items() if self.tracker.epoch(key) != epoch}
        for key in moved:
            start = self.tracker.read_to(key)
            if start is not None and tps[key] in self.consumer.assignment():
                self.consumer.seek(tps[key], start)
        return Fetched(
            {tp: rs for tp, rs in fetched.items() if (tp.topic, tp.partition) not in moved},
            [u for u in found if (u.topic, u.partition) not in moved],
        )

    async def _with_schemas(
        self, schemas: Schemas, fetched: Fetched, stop: asyncio.Event
    ) -> Fetched | None:
        """Fetch the schemas a fetch names before it is decoded (decoding reads memory),
        waiting out a registry that cannot give them: nothing of the fetch is tracked
        meanwhile, so nothing moves. A partition assigned again meanwhile keeps nothing of
        the fetch (its new start is read again); None on a stop: nothing is kept."""
        keys = {(tp.topic, tp.partition) for tp in fetched.batches} | {
            (u.topic, u.partition) for u in fetched.unreadable
        }
        epochs = {key: self.tracker.epoch(key) for key in keys}
        values = [getattr(m, "value", None) for ms in fetched.batches.values() for m in ms]
        if not await schemas.prefetch(values, stop):
            return None
        moved = {key for key in keys if self.tracker.epoch(key) != epochs[key]}
        return Fetched(
            {tp: ms for tp, ms in fetched.batches.items() if (tp.topic, tp.partition) not in moved},
            [u for u in fetched.unreadable if (u.topic, u.partition) not in moved],
        )

    async def markers(self) -> list[Settled]:
        """Offsets that hold no record for this worker: transaction markers, and records of
        aborted transactions under ``read_committed``. The consumer's position moves past
        them without a record; they are settled like one, so the offset stored in Postgres
        (and the lag) reaches the end of the partition instead of stopping at a marker.
        Called after the fetch's records are tracked."""
        settled: list[Settled] = []
        for tp in self.consumer.assignment():
            key = (tp.topic, tp.partition)
            epoch, read_to = self.tracker.epoch(key), self.tracker.read_to(key)
            if epoch is None or read_to is None or key in self.revoking:
                continue
            try:
                position = await self.consumer.position(tp)
            except KafkaError:  # no longer assigned (IllegalStateError)
                continue
            if position <= read_to or self.tracker.epoch(key) != epoch:
                continue
            if self.tracker.track(key, position - 1):
                settled.append(Settled(tp.topic, tp.partition, position - 1, epoch))
        return settled
