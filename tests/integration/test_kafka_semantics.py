"""What the input topic can be on Apache Kafka and not on Tansu (which has no transactions,
no log cleaner and wrong end offsets): written by a transactional producer, compacted, and
measured against real end offsets.

- aborted upstream transactions are never embedded (``kafka.isolation_level``, default
  ``read_committed``), and the offsets stored and the lag reach the end past the markers;
- the lag metric equals the end offsets minus the offsets stored in Postgres;
- a worker that starts after the cleaner compacted the topic ends with the table of one that
  read the whole history (updates and deletes applied, the ordering rules of the README).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from fakeapi import FakeEmbeddingServer, fake_vector
from tests.conftest import Env, migrate_db, running, wait_until
from tests.integration.test_crashes import DIM, check_store, provider
from worker.app import Worker
from worker.kafka.clients import make_producer

pytestmark = pytest.mark.kafka_only

LAG = "embedding_worker_consumer_lag"


def event(doc_id: str, text: str) -> tuple[bytes, bytes]:
    return doc_id.encode(), json.dumps({"id": doc_id, "text": text}).encode()


async def end_offsets(env: Env, isolation_level: str = "read_committed") -> dict[int, int]:
    """The broker's end offsets (the last stable offset under read_committed)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=env.stack.bootstrap, isolation_level=isolation_level
    )
    await consumer.start()
    try:
        tps = [TopicPartition(env.topic, p) for p in range(4)]
        return {tp.partition: o for tp, o in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


def lag_metric(worker: Worker, topic: str) -> dict[int, float]:
    registry = worker.metrics.registry
    out = {}
    for p in range(4):
        value = registry.get_sample_value(LAG, {"topic": topic, "partition": str(p)})
        if value is not None:
            out[p] = value
    return out


async def caught_up_to_end(env: Env) -> bool:
    end = await end_offsets(env)
    return {p: o for p, o in (await env.stored_offsets()).items()} == end


# ---- transactional upstreams ----------------------------------------------------------


async def test_aborted_transactions_are_never_embedded(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, DIM)
    producer = AIOKafkaProducer(
        bootstrap_servers=env.stack.bootstrap, transactional_id=f"upstream-{uuid.uuid4().hex}"
    )
    await producer.start()
    committed: dict[str, str] = {}
    try:
        async with producer.transaction():
            for i in range(200):
                key, value = event(f"c-{i}", f"committed first {i}")
                await producer.send(env.topic, value, key=key)
                committed[f"c-{i}"] = f"committed first {i}"
        await producer.begin_transaction()
        for i in range(200):  # new ids, and new versions of committed ones: all must vanish
            key, value = event(f"a-{i}" if i % 2 else f"c-{i}", f"aborted {i}")
            await producer.send(env.topic, value, key=key)
        await producer.abort_transaction()
        async with producer.transaction():
            for i in range(200, 300):
                key, value = event(f"c-{i}", f"committed second {i}")
                await producer.send(env.topic, value, key=key)
                committed[f"c-{i}"] = f"committed second {i}"
    finally:
        await producer.stop()
    async with running(env.settings(provider(fake_api))) as worker:
        await wait_until(lambda: caught_up_to_end(env), 60, "offsets did not reach the end")

        async def no_lag() -> bool:
            return set(lag_metric(worker, env.topic).values()) == {0}

        await wait_until(no_lag, 30, f"lag stays {lag_metric(worker, env.topic)} at the end")
        assert worker.pipeline is not None
        stats = worker.pipeline.stats
    await check_store(env, committed)  # 300 rows, each once, each the committed text
    assert stats.consumed == 300 and stats.stored == 300
    assert sum(stats.dead_lettered.values()) == 0
    # Markers take offsets: the end is past the 500 records written (300 kept, 200 aborted).
    assert sum((await end_offsets(env)).values()) >= 500 + 3


async def test_read_uncommitted_takes_aborted_records(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    """The setting is what decides (and so the test above could fail)."""
    await migrate_db(env, DIM)
    producer = AIOKafkaProducer(
        bootstrap_servers=env.stack.bootstrap, transactional_id=f"upstream-{uuid.uuid4().hex}"
    )
    await producer.start()
    try:
        await producer.begin_transaction()
        for i in range(40):
            key, value = event(f"a-{i}", f"aborted {i}")
            await producer.send(env.topic, value, key=key)
        await producer.abort_transaction()
    finally:
        await producer.stop()
    settings = env.settings(provider(fake_api), kafka={"isolation_level": "read_uncommitted"})
    async with running(settings):
        await wait_until(lambda: caught_up_to_end(env), 60, "offsets did not reach the end")
    await check_store(env, {f"a-{i}": f"aborted {i}" for i in range(40)})


# ---- lag ------------------------------------------------------------------------------


async def test_lag_metric_is_end_offsets_minus_stored_offsets(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, DIM)
    await env.produce_records([event(f"d-{i}", f"first batch {i}") for i in range(400)])
    async with running(env.settings(provider(fake_api))) as worker:
        await wait_until(lambda: caught_up_to_end(env), 60, "the first 400 were not stored")
        fake_api.configure(auth_fault=True)  # from now on nothing is embedded: work waits
        await env.produce_records([event(f"e-{i}", f"second batch {i}") for i in range(300)])

        async def fetched_all() -> bool:
            lag = lag_metric(worker, env.topic)
            return sum(lag.values()) == 300

        await wait_until(fetched_all, 60, "the lag did not count the 300 unstored events")
        stored, end = await env.stored_offsets(), await end_offsets(env)
        lag = lag_metric(worker, env.topic)
        assert sum(stored.values()) == 400 and sum(end.values()) == 700
        assert lag == {p: end[p] - stored[p] for p in range(4)}
        fake_api.configure(auth_fault=False)
        await wait_until(lambda: caught_up_to_end(env), 60, "not stored after the fault")

        async def no_lag() -> bool:
            return set(lag_metric(worker, env.topic).values()) == {0}

        await wait_until(no_lag, 30, "the lag did not return to 0")


# ---- compacted input topic ------------------------------------------------------------

COMPACT = {
    "cleanup.policy": "compact",
    "segment.ms": "100",  # segments roll at once: only closed ones are cleaned
    "min.cleanable.dirty.ratio": "0.01",
    "min.compaction.lag.ms": "0",
}


async def compacted_env(env: Env) -> None:
    """Replace the env's input topic with a compacted one."""
    env.topic = env.topic.replace(".events", ".compacted")
    admin = AIOKafkaAdminClient(bootstrap_servers=env.stack.bootstrap)
    await admin.start()
    try:
        rf = env.stack.broker.replication_factor
        await admin.create_topics([NewTopic(env.topic, 4, rf, topic_configs=COMPACT)])
    finally:
        await admin.close()
    await env.stack.create_topics([env.topic], partitions=4)  # waits for the leaders


async def roll_segments(env: Env) -> None:
    """One record in each partition: it rolls the active segment (older than segment.ms)."""
    producer = make_producer(env.settings().kafka)
    await producer.start()
    try:
        for p in range(4):
            key, value = event(f"sentinel-{p}", f"rolls partition {p}")
            await producer.send_and_wait(env.topic, value, key=key, partition=p)
    finally:
        await producer.stop()


async def read_all(env: Env) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=env.stack.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(env.topic, p) for p in range(4)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        count = 0
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            batch = await consumer.getmany(timeout_ms=500)
            count += sum(len(records) for records in batch.values())
        return count
    finally:
        await consumer.stop()


async def table(env: Env, dsn: str) -> dict[str, Any]:
    conn = await env.connect() if dsn == env.dsn else None
    if conn is None:
        import asyncpg
        from pgvector.asyncpg import register_vector

        conn = await asyncpg.connect(dsn)
        await register_vector(conn)
    try:
        rows = await conn.fetch("SELECT id, embedding FROM embeddings")
        gone = await conn.fetch("SELECT id FROM embedding_tombstones")
    finally:
        await conn.close()
    return {
        "rows": {r["id"]: r["embedding"].to_numpy() for r in rows},
        "tombstones": {r["id"] for r in gone},
    }


async def test_worker_started_after_compaction_ends_with_the_same_table(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await compacted_env(env)
    await migrate_db(env, DIM)
    history: list[tuple[bytes, bytes | None]] = []
    history += [event(f"k-{i}", f"first version {i}") for i in range(200)]
    history += [event(f"k-{i}", f"second version {i}") for i in range(0, 200, 2)]
    history += [(f"k-{i}".encode(), None) for i in range(150, 200)]  # deletes
    expected = {f"k-{i}": f"{'second' if i % 2 == 0 else 'first'} version {i}" for i in range(150)}
    await env.produce_records(history)
    async with running(env.settings(provider(fake_api))) as full:
        await wait_until(lambda: caught_up_to_end(env), 60, "the history was not read")
        await asyncio.sleep(0.3)  # older than segment.ms: the next record rolls the segment
        await roll_segments(env)  # only closed segments are cleaned
        expected.update({f"sentinel-{p}": f"rolls partition {p}" for p in range(4)})
        await wait_until(lambda: caught_up_to_end(env), 60, "the sentinels were not read")
        assert full.pipeline is not None
        full_stats = full.pipeline.stats
    assert full_stats.consumed == len(history) + 4 and full_stats.deleted == 50
    # The whole history as the README's ordering rules say: the last version, deletes applied.
    before = await table(env, env.dsn)
    assert set(before["rows"]) == set(expected)
    for doc_id, text in expected.items():
        assert np.allclose(before["rows"][doc_id], fake_vector(text, DIM)), doc_id

    async def compacted() -> bool:
        # One record per key (tombstones are kept for delete.retention.ms, a day).
        return await read_all(env) == 200 + 4

    await wait_until(compacted, 90, "the log cleaner did not compact the topic")
    remaining = 204

    # A second worker, its own database and group, starts on the compacted topic.
    database = f"{env.group.replace('-group', '')}_late"
    late_dsn = await env.stack.create_database(database)
    late_group = f"{env.group}-late"
    settings = env.settings(
        provider(fake_api), kafka={"group_id": late_group}, postgres={"dsn": late_dsn}
    )
    conn_env = Env(env.stack, late_dsn, env.topic.removesuffix(".compacted"))
    conn_env.topic, conn_env.group = env.topic, late_group
    await migrate_db(conn_env, DIM)
    async with running(settings) as late:

        async def late_caught_up() -> bool:
            return await conn_env.stored_offsets() == await end_offsets(env)

        await wait_until(late_caught_up, 60, "the late worker did not reach the end")
        assert late.pipeline is not None
        late_stats = late.pipeline.stats
    after = await table(env, late_dsn)
    assert late_stats.consumed == remaining < len(history) + 4
    assert set(after["rows"]) == set(before["rows"])
    for doc_id, vector in before["rows"].items():
        assert np.allclose(after["rows"][doc_id], vector), doc_id
    # Tombstones that survived compaction are applied as deletes of rows it never had.
    assert after["tombstones"] <= before["tombstones"]
    assert sum(late_stats.dead_lettered.values()) == 0
    await check_store(conn_env, expected)  # each row applied once: version 1
