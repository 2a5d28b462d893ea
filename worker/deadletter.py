"""Send dead letters and wait for the broker's acknowledgement before the offset moves on."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError

from worker.events import DeadLetter

log = structlog.get_logger(__name__)


class DeadLetterSink:
    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self.counts: Counter[str] = Counter()

    async def send(self, letters: Sequence[tuple[bytes | None, DeadLetter]]) -> None:
        """Publish ``(original key, envelope)`` pairs; returns once all are acknowledged.

        Retriable broker errors are retried without limit (the offsets wait meanwhile);
        anything else propagates and stops the worker rather than lose a dead letter.
        """
        if not letters:
            return
        attempt = 0
        while True:
            try:
                futures = [
                    await self.producer.send(
                        self.topic,
                        key=None if key is None else key[:4096],
                        value=letter.model_dump_json().encode("utf-8"),
                    )
                    for key, letter in letters
                ]
                await asyncio.gather(*futures)
                break
            except KafkaError as exc:
                if not (exc.retriable or isinstance(exc, KafkaTimeoutError)):
                    raise
                delay = min(10.0, 0.1 * 2 ** min(attempt, 10))
                attempt += 1
                log.warning("dead-letter send failed, retrying", error=repr(exc), delay_s=delay)
                await asyncio.sleep(delay)
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
