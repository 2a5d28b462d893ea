"""Consume interactions into user profiles (``worker.profiles``), exactly once.

A consumer of its own (group ``<kafka.group_id>.interactions``) reads
``recommend.interactions_topic`` one fetch at a time, as the moderation decisions' consumer
does (``worker.analysis.learn``): bad interactions are dead-lettered (acknowledged first) to
``recommend.interactions_dlq_topic``, and the profiles and the fetch's offsets are stored in
one transaction. On assignment each partition is sought to the offset stored there, so a
crash between the read and the commit reads the interactions again and one after it never
applies them twice; the transaction also locks those offsets and skips what they cover,
which keeps a replica that lost its partitions from applying them a second time.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from worker import profiles, store
from worker.analysis.stage import RunPg
from worker.config import Settings
from worker.deadletter import DeadLetterSink
from worker.decode import Record
from worker.envelope import dead_letter, envelope_budget
from worker.events import DeadLetter, Reason
from worker.profiles import Interaction, Resolved
from worker.unreadable import UNREADABLE_ERRORS, isolate

log = structlog.get_logger(__name__)


def group_of(settings: Settings) -> str:
    return f"{settings.kafka.group_id}.interactions"


@dataclass
class InteractionStats:
    consumed: int = 0
    applied: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)


class Profiler(ConsumerRebalanceListener):  # type: ignore[misc]
    STUCK_AFTER_S = 60.0

    def __init__(
        self,
        settings: Settings,
        consumer: AIOKafkaConsumer,
        dead_letters: DeadLetterSink,
        pg: RunPg,
        model: str,
    ) -> None:
        assert settings.recommend.interactions_topic is not None
        self.settings = settings
        self.topic = settings.recommend.interactions_topic
        self.group = group_of(settings)
        self.consumer = consumer
        self.dead_letters = dead_letters
        self.pg = pg
        self.model = model
        self.budget = envelope_budget(settings.kafka.dlq_max_message_bytes)
        self.stats = InteractionStats()
        self.running = False
        self.last_poll = time.monotonic()
        self.fatal: BaseException | None = None
        # Bumped by every assignment: a fetch from before one is dropped (its partitions
        # were sought back to their stored offsets and are read again).
        self._generation = 0
        self._read_to: dict[TopicPartition, int] = {}

    def checks(self) -> dict[str, bool]:
        return {
            "interactions_consuming": self.running,
            "interactions_polling": time.monotonic() - self.last_poll < self.STUCK_AFTER_S,
        }

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        try:
            await self._assign(assigned)
        except Exception as exc:  # aiokafka would swallow it and leave the partitions unread
            log.exception("interactions partition assignment failed; stopping")
            self.fatal = exc

    async def _assign(self, assigned: list[TopicPartition]) -> None:
        self._generation += 1
        stored = await self.pg(
            "load interaction offsets", lambda c: store.load_offsets(c, self.group, self.topic)
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
            "interactions partitions assigned", partitions=sorted(t.partition for t in assigned)
        )

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self._generation += 1
        for tp in revoked:
            self._read_to.pop(tp, None)

    async def run(self, stop: asyncio.Event) -> None:
        self.running = True
        try:
            while not stop.is_set() and self.fatal is None:
                self.last_poll = time.monotonic()
                generation = self._generation
                fetched, unreadable = await self._poll()
                records = [
                    Record.of(tp.topic, tp.partition, m)
                    for tp in sorted(fetched, key=lambda t: t.partition)
                    for m in fetched[tp]
                ]
                if generation != self._generation:
                    self._rewind()
                elif records or unreadable:
                    await self.handle(records, unreadable, generation)
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
            log.warning("a fetched interaction cannot be parsed; isolating it", error=repr(exc))
            found, bad = await isolate(
                self.consumer, dict(self._read_to), self.settings.kafka.max_poll_records
            )
            return found, [u.letter() for u in bad]

    async def handle(
        self, records: list[Record], unreadable: list[DeadLetter], generation: int
    ) -> None:
        """One fetch: dead-letter what cannot be applied, apply the rest with the offsets."""
        s = self.settings
        letters: list[tuple[bytes | None, DeadLetter]] = [(None, u) for u in unreadable]
        parsed: list[Interaction] = []
        for record in records:
            out = profiles.parse(record, s.default_namespace, s.max_clock_skew_s, self.budget)
            if isinstance(out, DeadLetter):
                letters.append((record.key, out))
            else:
                parsed.append(out)
        found = await self._lookup(parsed)
        resolved: list[Resolved] = []
        for i in parsed:
            vector = found.get(i.item_key)
            if vector is None:
                letter = dead_letter(
                    i.record,
                    Reason.UNKNOWN_ID,
                    f"no stored item {i.item!r} of model {self.model!r} in namespace "
                    f"{i.namespace!r} (not stored yet, deleted, or a zero vector); replay the "
                    "interaction once the item is stored",
                    namespace=i.namespace,
                    id=i.item,
                    budget=self.budget,
                )
                letters.append((i.record.key, letter))
            else:
                resolved.append(Resolved(i, vector))
        if letters:
            letters.sort(key=lambda kl: (kl[1].source.partition, kl[1].source.offset))
            await self.dead_letters.send(letters)
            for _, letter in letters:
                self.stats.dead_lettered[letter.reason.value] += 1
        offsets: dict[int, int] = {}
        for record in records:
            offsets[record.partition] = max(offsets.get(record.partition, 0), record.offset + 1)
        for u in unreadable:
            p = u.source.partition
            offsets[p] = max(offsets.get(p, 0), u.source.offset + 1)
        if generation != self._generation:
            self._rewind()  # assigned again meanwhile: read again from the stored offsets
            return
        r = s.recommend
        applied = await self.pg(
            "store profiles",
            partial(
                profiles.apply,
                resolved=resolved,
                model=self.model,
                half_life_s=r.half_life_s,
                seen_max=r.seen_max,
                group_id=self.group,
                topic=self.topic,
                offsets=offsets,
            ),
        )
        for partition, offset in offsets.items():
            tp = TopicPartition(self.topic, partition)
            if tp in self._read_to:  # still ours
                self._read_to[tp] = max(offset, self._read_to[tp])
        self.stats.consumed += len(records) + len(unreadable)
        self.stats.applied += applied
        if applied:
            log.info("profiles updated", interactions=applied, dead_lettered=len(letters))

    def _rewind(self) -> None:
        """Back to the offsets stored last (what was read since is read again)."""
        for tp, offset in self._read_to.items():
            if tp in self.consumer.assignment():
                self.consumer.seek(tp, offset)

    async def _lookup(self, parsed: list[Interaction]) -> dict[tuple[str, str], np.ndarray]:
        """The items' unit vectors; an item not stored yet is looked up again until its
        interaction is ``recommend.grace_s`` old (its event may still be on its way)."""
        keys = [i.item_key for i in parsed]
        find = partial(profiles.lookup, model=self.model)
        found = await self.pg("interaction items", partial(find, keys=keys))
        grace_ms = self.settings.recommend.grace_s * 1000
        now_ms = time.time() * 1000
        young = [
            i.record.timestamp_ms
            for i in parsed
            if i.item_key not in found and i.record.timestamp_ms is not None
        ]
        wait_ms = max((t + grace_ms - now_ms for t in young), default=0.0)
        if wait_ms > 0:
            await asyncio.sleep(min(wait_ms, grace_ms) / 1000)
            missing = [k for k in keys if k not in found]
            found |= await self.pg("interaction items", partial(find, keys=missing))
        return found
