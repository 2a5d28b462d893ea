"""Produce events to Kafka: the demo's sample file, or an operator's JSONL file."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from aiokafka import AIOKafkaProducer

from worker.config import KafkaSettings
from worker.kafka import make_producer


def key_of(value: bytes) -> bytes | None:
    """The content id as the key, so that one id always lands in one partition."""
    try:
        data = json.loads(value)
    except ValueError:
        return None
    if isinstance(data, dict) and isinstance(data.get("id"), str):
        return str(data["id"]).encode("utf-8")
    return None


async def produce_values(
    producer: AIOKafkaProducer, topic: str, values: Iterable[bytes | None], keys: bool = True
) -> dict[int, int]:
    """Send values in order; return the highest offset acknowledged per partition."""
    futures = []
    for value in values:
        key = key_of(value) if (keys and value is not None) else None
        futures.append(await producer.send(topic, key=key, value=value))
    high: dict[int, int] = {}
    for fut in futures:
        meta = await fut
        high[meta.partition] = max(high.get(meta.partition, -1), meta.offset)
    return high


def read_lines(path: Path) -> list[bytes]:
    return [line for line in path.read_bytes().splitlines() if line.strip()]


async def produce_file(k: KafkaSettings, topic: str, path: Path) -> int:
    lines = read_lines(path)
    producer = make_producer(k)
    await producer.start()
    try:
        await produce_values(producer, topic, lines)
    finally:
        await producer.stop()
    return len(lines)
