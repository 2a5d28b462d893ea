"""Send dead letters (acknowledged before the offset moves on) and log each one."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

from worker.events import DeadLetter
from worker.sinks.publish import publish

if TYPE_CHECKING:
    from worker.ops.tracing import Tracing

log = structlog.get_logger(__name__)

# The broker (or the client) refused a record for its size: no retry can fix that.
TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)


class DeadLetterSink:
    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self.counts: Counter[str] = Counter()
        self.tracing: Tracing | None = None

    async def send(self, letters: Sequence[tuple[bytes | None, DeadLetter]]) -> None:
        """Publish ``(original key, envelope)`` pairs; returns once all are acknowledged.

        Envelopes are built to fit ``kafka.dlq_max_message_bytes``; should the topic take
        less than that, the refused letters go again without copies (source position, sizes
        and hashes only; replay reads the original from its source) rather than stop the
        worker. A letter the batch already delivered may then be sent twice (at least once).
        With tracing on, a letter's headers carry its event's span.
        """
        if self.tracing is None:
            await self._send(letters, None)
        else:
            events = [letter._trace for _, letter in letters]
            with self.tracing.producing(self.topic, events):
                await self._send(letters, [self.tracing.headers(e) for e in events])
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

    async def _send(
        self,
        letters: Sequence[tuple[bytes | None, DeadLetter]],
        headers: list[list[tuple[str, bytes]]] | None,
    ) -> None:
        try:
            await publish(self.producer, self.topic, [(k, _json(x)) for k, x in letters], headers)
        except TOO_LARGE:
            for i, (key, letter) in enumerate(letters):
                one = None if headers is None else [headers[i]]
                try:
                    await publish(self.producer, self.topic, [(key, _json(letter))], one)
                except TOO_LARGE as exc:
                    log.warning(
                        "dead letter too large for its topic; sent without copies",
                        topic=self.topic,
                        bytes=len(_json(letter)),
                        error=repr(exc),
                    )
                    stripped = [(key, _json(letter.stripped()))]
                    await publish(self.producer, self.topic, stripped, one)


def _json(letter: DeadLetter) -> bytes:
    return letter.model_dump_json().encode("utf-8")
