"""Produce events to Kafka: the demo's sample file, or an operator's JSONL file.

An operator's file is checked line by line by the worker's own decoder before anything is
sent, so that "produced N events" counts events the worker will store, never lines it would
dead-letter (the demo sends its invalid lines on purpose, through `produce_values`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaProducer

from worker.config import ConfigError, KafkaSettings, Settings
from worker.events import DeadLetter
from worker.kafka.clients import make_producer, started
from worker.model import Change, Record
from worker.pipeline.decode import Limits, decode


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


@dataclass(frozen=True)
class Invalid:
    """A line of the file the worker would dead-letter, and why (its dead-letter reason)."""

    line: int  # 1-based, counting blank lines
    reason: str
    message: str


@dataclass(frozen=True)
class CheckedFile:
    values: list[bytes]  # every non-blank line, in order
    invalid: list[Invalid]
    # Each line's record key: the content id the worker reads from it (under any input
    # format, e.g. a Debezium row's key column), else the native `id` field if any.
    keys: list[bytes | None]


def check_file(path: Path, settings: Settings) -> CheckedFile:
    """Each non-blank line through `decode` with the limits of `settings`; raises OSError
    when the file cannot be read, ConfigError under a schema-registry format."""
    limits = Limits.of(settings)
    if limits.schemas is not None:
        raise ConfigError(
            f"produce writes JSON lines; input.format {settings.input.format.value} reads the "
            "schema-registry wire format (produce those records with a Confluent serializer)"
        )
    values: list[bytes] = []
    invalid: list[Invalid] = []
    keys: list[bytes | None] = []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        values.append(line)
        verdict = decode(Record("file", 0, number, None, line), limits)
        if isinstance(verdict, DeadLetter):
            invalid.append(Invalid(number, verdict.reason.value, verdict.message))
        keys.append(verdict.id.encode() if isinstance(verdict, Change) else key_of(line))
    return CheckedFile(values, invalid, keys)


async def produce_file(k: KafkaSettings, topic: str, checked: CheckedFile) -> None:
    """The file's lines in order, each keyed by its content id (one id, one partition)."""
    async with started(make_producer(k)) as producer:
        futures = [
            await producer.send(topic, key=key, value=value)
            for key, value in zip(checked.keys, checked.values, strict=True)
        ]
        for fut in futures:
            await fut
