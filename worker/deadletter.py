"""Send dead letters (acknowledged before the offset moves on) and log each one."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import structlog
from aiokafka import AIOKafkaProducer

from worker.events import DeadLetter
from worker.publish import publish

log = structlog.get_logger(__name__)


class DeadLetterSink:
    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self.counts: Counter[str] = Counter()

    async def send(self, letters: Sequence[tuple[bytes | None, DeadLetter]]) -> None:
        """Publish ``(original key, envelope)`` pairs; returns once all are acknowledged."""
        await publish(
            self.producer,
            self.topic,
            [(key, letter.model_dump_json().encode("utf-8")) for key, letter in letters],
        )
        for _, letter in letters:
            self.counts[letter.reason.value] += 1
            log.warning(
                "event dead-lettered",
                reason=letter.reason.value,
                detail=letter.message,
                namespace=letter.namespace,
                id=letter.id,
                topic=letter.source.topic,
                partition=letter.source.partition,
                offset=letter.source.offset,
            )
