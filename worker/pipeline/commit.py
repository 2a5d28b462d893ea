"""Copy the offsets stored in Postgres to Kafka, off the writer's path.

Postgres holds the offsets that count (stored in the same transaction as the rows); Kafka's
copy is for lag monitoring, so it is sent at most every ``every_s``, the writer never waits
for it, and what fails stays pending for the next try.
"""

from __future__ import annotations

import asyncio

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from worker.pipeline.offsets import TP

log = structlog.get_logger(__name__)


class KafkaCommits:
    def __init__(self, consumer: AIOKafkaConsumer, revoking: set[TP], every_s: float) -> None:
        self.consumer = consumer
        # Partitions being revoked (shared with the runner): no commit while any is.
        self.revoking = revoking
        self.every_s = every_s
        self._pending: dict[TP, int] = {}
        self._due = asyncio.Event()

    def offer(self, offsets: dict[TP, int]) -> None:
        """Offsets just stored in Postgres."""
        for tp, offset in offsets.items():
            self._pending[tp] = max(offset, self._pending.get(tp, offset))
        self._due.set()

    def forget(self, tp: TP) -> None:
        self._pending.pop(tp, None)

    async def loop(self) -> None:
        """At most every ``every_s``; the runner commits what is left when it stops."""
        while True:
            await self._due.wait()
            self._due.clear()
            await self.commit()
            await asyncio.sleep(self.every_s)

    async def commit(self) -> None:
        """What fails stays pending; partitions no longer assigned are dropped."""
        if not self._pending or self.revoking:
            return
        assigned = self.consumer.assignment()
        sent = {tp: o for tp, o in self._pending.items() if TopicPartition(*tp) in assigned}
        try:
            if sent:
                commit = {TopicPartition(*tp): o for tp, o in sent.items()}
                await asyncio.wait_for(self.consumer.commit(commit), timeout=5.0)
        except (KafkaError, TimeoutError) as exc:
            log.info("kafka offset commit skipped", error=repr(exc))
            return
        for tp in list(self._pending):
            # Done, unless it moved on while this commit ran.
            if tp not in sent or self._pending[tp] == sent[tp]:
                del self._pending[tp]
