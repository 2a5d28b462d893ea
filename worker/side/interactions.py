"""Consume interactions into user profiles (``worker.side.profiles``), exactly once.

A consumer of its own (``worker.side.consumer``, group ``<kafka.group_id>.interactions``)
reads ``recommend.interactions_topic`` one fetch at a time, as the moderation decisions'
consumer does (``worker.side.learn``): bad interactions are dead-lettered (acknowledged
first) to ``recommend.interactions_dlq_topic``, and the profiles and the fetch's offsets are
stored in one transaction, exactly once; the transaction also locks those offsets and skips
what they cover, which keeps a replica that lost its partitions from applying them twice.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import structlog
from aiokafka import AIOKafkaConsumer

from worker.config import Settings
from worker.envelope import dead_letter
from worker.events import DeadLetter, Reason
from worker.model import Record
from worker.side import profiles
from worker.side.consumer import ConsumerStats, Letters, SideConsumer
from worker.side.profiles import Interaction, Resolved
from worker.sinks.deadletter import DeadLetterSink
from worker.sinks.store import RunPg

log = structlog.get_logger(__name__)


def group_of(settings: Settings) -> str:
    return f"{settings.kafka.group_id}.interactions"


class Profiler(SideConsumer):
    def __init__(
        self,
        settings: Settings,
        consumer: AIOKafkaConsumer,
        dead_letters: DeadLetterSink,
        pg: RunPg,
        model: str,
    ) -> None:
        assert settings.recommend.interactions_topic is not None
        topic = settings.recommend.interactions_topic
        stats = ConsumerStats()
        super().__init__("interactions", settings, consumer, dead_letters, pg, topic, stats)
        self.model = model

    async def handle(
        self, records: list[Record], unreadable: list[DeadLetter], generation: int
    ) -> None:
        """One fetch: dead-letter what cannot be applied, apply the rest with the offsets."""
        s = self.settings
        letters: Letters = [(None, u) for u in unreadable]
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
        await self.send_letters(letters)
        offsets = self.offsets_after(records, unreadable)
        if self.stale(generation):
            return  # assigned again meanwhile: read again from the stored offsets
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
                offsets={p: o for (_, p), o in offsets.items()},
            ),
        )
        self.stored(offsets, len(records) + len(unreadable), applied)
        if applied:
            log.info("profiles updated", interactions=applied, dead_lettered=len(letters))

    async def _lookup(self, parsed: list[Interaction]) -> dict[tuple[str, str], np.ndarray]:
        """The items' unit vectors, waiting out ``recommend.grace_s`` for young interactions
        (the item's own event may still be on its way)."""
        find = partial(profiles.lookup, model=self.model)
        wanted = [(i.item_key, i.record.timestamp_ms) for i in parsed]
        grace_s = self.settings.recommend.grace_s
        return await self.lookup_with_grace("interaction items", find, wanted, grace_s)
