"""Shared fixtures: one embedded stack per session, a fresh database and topics per test.

Nothing starts until a test asks for ``stack``, ``env`` or ``fake_api``; tests/unit never does,
tests/integration (marked ``integration`` by its conftest.py) does.

The stack's broker is Tansu unless ``EMBEDDING_WORKER_DEVSTACK_BROKER`` says otherwise
(``make test-kafka`` sets ``kafka``). On Apache Kafka only the tests that use a broker run:
those that use the ``stack`` fixture or are marked ``devstack`` or ``kafka_only``, and those
marked ``schema_registry``, which then run against a real registry (Apicurio, see
tests/integration/test_registry.py); the others do not depend on the broker and ran in
``make test`` already. Tests marked ``kafka_only``
need what only Apache Kafka has (data that survives a broker restart, replicas) and are
skipped on Tansu.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any

import asyncpg
import pytest

from fakeapi import FakeConfig, FakeEmbeddingServer
from worker.app import Worker
from worker.config import Settings, environment_for, load_settings
from worker.kafka.clients import make_producer
from worker.sinks import postgres as store
from worker.sinks.migrate import migrate
from worker.sinks.vectors import register_vector
from worker.tools.devstack import BROKER_ENV, DevStack
from worker.tools.produce import produce_values

API_KEY = "sk-test-0123456789"
_counter = itertools.count()


def broker_kind() -> str:
    return os.environ.get(BROKER_ENV, "tansu").strip().lower() or "tansu"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kind = broker_kind()
    if kind != "tansu":
        keep = [
            i
            for i in items
            if "stack" in getattr(i, "fixturenames", ())
            or i.get_closest_marker("devstack")
            or i.get_closest_marker("kafka_only")
            or i.get_closest_marker("schema_registry")
        ]
        if len(keep) < len(items):
            config.hook.pytest_deselected(items=[i for i in items if i not in keep])
            items[:] = keep
        return
    skip = pytest.mark.skip(reason="needs Apache Kafka (make test-kafka)")
    for item in items:
        if item.get_closest_marker("kafka_only"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
async def stack() -> AsyncIterator[DevStack]:
    async with DevStack() as s:
        yield s


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeEmbeddingServer]:
    with FakeEmbeddingServer(FakeConfig(api_key=API_KEY)) as server:
        yield server


@pytest.fixture
def fake_api(fake_server: FakeEmbeddingServer) -> FakeEmbeddingServer:
    """The session's fake API with default behaviour and zeroed counters."""
    fake_server.configure(**FakeConfig(api_key=API_KEY).to_dict())
    fake_server.reset_stats()
    return fake_server


# (key, value) or (key, value, headers), produced as is.
RawRecord = (
    tuple[bytes | None, bytes | None] | tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]
)


class Env:
    """One test's world: its own database, topics and consumer group on the shared stack."""

    def __init__(self, stack: DevStack, dsn: str, name: str) -> None:
        self.stack = stack
        self.dsn = dsn
        self.topic = f"{name}.events"
        self.dlq = f"{name}.dlq"
        self.group = f"{name}-group"

    def settings(self, provider: dict[str, Any] | None = None, **extra: Any) -> Settings:
        return load_settings(**self.config(provider, **extra))

    def worker_env(self, provider: dict[str, Any] | None = None, **extra: Any) -> dict[str, str]:
        """The same configuration as environment variables, for a worker subprocess."""
        return environment_for(self.config(provider, **extra))

    def config(self, provider: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        kafka = {
            **self.stack.kafka_settings(),
            "group_id": self.group,
            "input_topic": self.topic,
            "dlq_topic": self.dlq,
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 300,
        }
        kafka.update(extra.pop("kafka", {}))
        batch = {"linger_ms": 20}
        batch.update(extra.pop("batch", {}))
        return {
            "kafka": kafka,
            "postgres": {"dsn": self.dsn},
            "provider": provider or {"kind": "local"},
            "batch": batch,
            "http": {"port": 0, "host": "127.0.0.1", **extra.pop("http", {})},
            **extra,
        }

    async def produce(
        self, values: Iterable[bytes | dict[str, Any] | None], keys: bool = True
    ) -> dict[int, int]:
        """Produce in order; dicts are JSON-encoded. Returns the highest offset per partition."""
        encoded = [json.dumps(v).encode() if isinstance(v, dict) else v for v in values]
        producer = make_producer(self.settings().kafka)
        await producer.start()
        try:
            return await produce_values(producer, self.topic, encoded, keys=keys)
        finally:
            await producer.stop()

    async def produce_raw(self, records: Iterable[RawRecord]) -> dict[int, int]:
        """Produce exact (key, value) pairs; returns the highest offset per partition."""
        return highest(await self.produce_records(records))

    async def produce_records(
        self,
        records: Iterable[RawRecord],
    ) -> list[tuple[int, int]]:
        """Produce exact (key, value[, headers]); returns each one's (partition, offset)."""
        producer = make_producer(self.settings().kafka)
        await producer.start()
        try:
            futures = [
                await producer.send(
                    self.topic, key=r[0], value=r[1], headers=r[2] if len(r) > 2 else None
                )
                for r in records
            ]
            return [(m.partition, m.offset) for m in await asyncio.gather(*futures)]
        finally:
            await producer.stop()

    async def connect(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self.dsn)
        await register_vector(conn)
        return conn

    async def stored_offsets(self) -> dict[int, int]:
        conn = await asyncpg.connect(self.dsn)
        try:
            return await store.load_offsets(conn, self.group, self.topic)
        finally:
            await conn.close()

    async def kafka_committed(self) -> dict[int, int]:
        """The group's offsets in Kafka (the copy kept for lag monitoring)."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(bootstrap_servers=self.stack.bootstrap, group_id=self.group)
        await consumer.start()
        try:
            out = {}
            for p in range(4):
                committed = await consumer.committed(TopicPartition(self.topic, p))
                if committed is not None:
                    out[p] = committed
            return out
        finally:
            await consumer.stop()

    async def wait_for_offsets(self, high: dict[int, int], seconds: float = 60) -> None:
        """Until Postgres holds an offset past every produced record."""

        async def caught_up() -> bool:
            stored = await self.stored_offsets()
            return all(stored.get(p, 0) > h for p, h in high.items())

        await wait_until(caught_up, seconds, "the worker did not store every offset")

    async def dead_letters(self, expected: int, seconds: float = 30) -> list[dict[str, Any]]:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(bootstrap_servers=self.stack.bootstrap)
        await consumer.start()
        letters: list[dict[str, Any]] = []
        try:
            tp = TopicPartition(self.dlq, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            deadline = asyncio.get_running_loop().time() + seconds
            while asyncio.get_running_loop().time() < deadline:
                batch = await consumer.getmany(tp, timeout_ms=300)
                letters += [json.loads(m.value) for m in batch.get(tp, [])]
                if len(letters) >= expected and not batch:
                    break
        finally:
            await consumer.stop()
        return letters


def highest(positions: Iterable[tuple[int, int]]) -> dict[int, int]:
    high: dict[int, int] = {}
    for partition, offset in positions:
        high[partition] = max(high.get(partition, -1), offset)
    return high


async def wait_until(
    condition: Callable[[], Awaitable[bool]], seconds: float, message: str
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(message)
        await asyncio.sleep(0.1)


@pytest.fixture
async def env(stack: DevStack) -> Env:
    return await make_env(stack)


async def make_env(stack: DevStack) -> Env:
    """A database, a 4-partition input topic and a dead-letter topic of their own."""
    name = f"t{next(_counter)}_{uuid.uuid4().hex[:8]}"
    dsn = await stack.create_database(name)
    await stack.create_topics([f"{name}.events"], partitions=4)
    await stack.create_topics([f"{name}.dlq"], partitions=1)
    return Env(stack, dsn, name)


async def migrate_db(env: Env, dimension: int) -> None:
    conn = await asyncpg.connect(env.dsn)
    try:
        await migrate(conn, dimension)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def running(settings: Settings, **options: Any) -> AsyncIterator[Worker]:
    """A worker running in this event loop; stopped gracefully (and checked) on exit.

    ``options`` go to ``Worker`` (``span_exporter``)."""
    worker = Worker(settings, **options)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))

    async def started() -> bool:
        if task.done():
            await task  # surface why it could not start
        return worker.pipeline is not None

    try:
        await wait_until(started, 30, "the worker did not start")
        yield worker
        if task.done():
            await task  # surface why it stopped early
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)


def dashscope(fake: FakeEmbeddingServer, dimension: int = 256, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "dashscope",
        "base_url": fake.url + "/api/v1",
        "api_key": API_KEY,
        "dimension": dimension,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.2,
        **extra,
    }


def openai(fake: FakeEmbeddingServer, dimension: int = 256, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "openai",
        "base_url": fake.openai_url,
        "api_key": API_KEY,
        "dimension": dimension,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.2,
        **extra,
    }
