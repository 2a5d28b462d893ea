"""Produce records and return only once the broker acknowledged every one of them.

Dead letters and analysis results both go through here: an offset may move on only after
what its event produced is durable. Retriable broker errors are retried without limit (the
offsets wait meanwhile); anything else propagates and stops the worker rather than lose a
record.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError

from worker import backoff

log = structlog.get_logger(__name__)

MAX_KEY_BYTES = 4096


async def publish(
    producer: AIOKafkaProducer,
    topic: str,
    records: Sequence[tuple[bytes | None, bytes]],
    headers: Sequence[list[tuple[str, bytes]]] | None = None,
) -> None:
    """Send ``(key, value)`` pairs to ``topic`` (with ``headers[i]`` for the i-th, if given:
    worker.ops.tracing's); returns when all are acknowledged."""
    if not records:
        return
    attempt = 0
    while True:
        try:
            futures = [
                await producer.send(
                    topic,
                    key=None if key is None else key[:MAX_KEY_BYTES],
                    value=value,
                    headers=None if headers is None else headers[i],
                )
                for i, (key, value) in enumerate(records)
            ]
            await asyncio.gather(*futures)
            return
        except KafkaError as exc:
            if not (exc.retriable or isinstance(exc, KafkaTimeoutError)):
                raise
            delay = backoff.capped(attempt, 0.1, 10.0)
            attempt += 1
            log.warning("produce failed, retrying", topic=topic, error=repr(exc), delay_s=delay)
            await asyncio.sleep(delay)
