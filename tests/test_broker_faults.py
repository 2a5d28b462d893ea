"""The broker fails while events flow (Apache Kafka only: Tansu keeps nothing across a
restart and has no replicas). The worker runs on without being restarted, and every event
ends up stored once or dead-lettered: none lost, none applied twice (row versions stay 1).

One node for a restart on its own log dirs (the session's stack), three for leader failover
(this module's cluster: replication factor 3, ``min.insync.replicas=2``, producers ack all).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from fakeapi import FakeEmbeddingServer
from tests.conftest import Env, highest, make_env, migrate_db, running, wait_until
from tests.test_crashes import DIM, check_store, corpus, provider, stored_total
from worker.devstack import DevStack
from worker.devstack.kafka import KafkaBroker

pytestmark = pytest.mark.kafka_only


@pytest.fixture(scope="module")
async def cluster() -> AsyncIterator[DevStack]:
    async with DevStack("kafka-cluster") as stack:
        yield stack


def kafka(stack: DevStack) -> KafkaBroker:
    assert isinstance(stack.broker, KafkaBroker)
    return stack.broker


async def partitions(stack: DevStack, topic: str) -> list[dict[str, Any]]:
    """The topic's partitions as the cluster describes them (leader, replicas, isr).

    Retried: until the controller fences a killed node (its session times out), metadata
    still lists it, and the admin client may pick it to ask."""
    for attempt in range(20):
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka(stack).live_bootstrap())
        try:
            await admin.start()
            (described,) = await admin.describe_topics([topic])
            return sorted(described["partitions"], key=lambda p: p["partition"])
        except KafkaError:
            if attempt == 19:
                raise
            await asyncio.sleep(0.5)
        finally:
            await admin.close()
    raise AssertionError("unreachable")


async def broker_config(stack: DevStack, node: int, name: str) -> str:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka(stack).live_bootstrap())
    await admin.start()
    try:
        resource = ConfigResource(ConfigResourceType.BROKER, str(node), {name: None})
        (response,) = await admin.describe_configs([resource])
    finally:
        await admin.close()
    (entry,) = response.to_object()["resources"][0]["config_entries"]
    return str(entry["config_value"])


async def wait_isr(stack: DevStack, topic: str, size: int) -> None:
    async def isr_is_size() -> bool:
        return all(len(p["isr"]) == size for p in await partitions(stack, topic))

    await wait_until(isr_is_size, 90, f"the in-sync replicas of {topic} did not become {size}")


async def check_letters(env: Env, expected: set[tuple[int, int]]) -> None:
    letters = await env.dead_letters(expected=len(expected))
    lettered = [(x["source"]["partition"], x["source"]["offset"]) for x in letters]
    assert len(lettered) == len(set(lettered)), "an event was dead-lettered twice"
    assert set(lettered) == expected
    assert {x["reason"] for x in letters} == {"empty_text"}


async def test_broker_kill_9_and_restart_mid_stream_loses_nothing(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    broker = kafka(env.stack)
    fake_api.configure(latency_ms=30)
    await migrate_db(env, DIM)
    records, texts = corpus(4_000, bad_every=200)
    first, second = records[:3_000], records[3_000:]
    positions = await env.produce_records(first)
    # <= 4 requests x 10 texts per 30 ms: the kill lands mid-stream on a fast machine too.
    async with running(env.settings(provider(fake_api, max_concurrency=4))) as worker:

        async def moved() -> bool:
            return await stored_total(env) > 0

        await wait_until(moved, 60, "no progress before the kill")
        await broker.kill(1)
        assert await stored_total(env) < len(first), "the stream ended before the kill"
        await asyncio.sleep(3)
        await broker.restart(1)
        positions += await env.produce_records(second)  # after the restart, to the same topic
        await env.wait_for_offsets(highest(positions), seconds=180)
        stats = worker.pipeline.stats if worker.pipeline else None
    assert stats is not None
    bad = {positions[i] for i in range(199, 4_000, 200)}
    await check_store(env, texts)  # every good id once, version 1
    assert await env.stored_offsets() == {p: h + 1 for p, h in highest(positions).items()}
    await check_letters(env, bad)
    assert stats.stored == len(texts) and sum(stats.dead_lettered.values()) == len(bad)


async def test_cluster_replicates_to_three_and_takes_acks_all_with_a_broker_stopped(
    cluster: DevStack,
) -> None:
    env = await make_env(cluster)
    assert [sorted(p["replicas"]) for p in await partitions(cluster, env.topic)] == [[1, 2, 3]] * 4
    assert await broker_config(cluster, 1, "min.insync.replicas") == "2"
    await wait_isr(cluster, env.topic, 3)
    await kafka(cluster).stop_node(3)
    await wait_isr(cluster, env.topic, 2)
    high = await env.produce([{"id": f"d{i}", "text": f"text {i}"} for i in range(100)])
    assert sum(h + 1 for h in high.values()) == 100, "acks=all with two of three in sync"
    await kafka(cluster).restart(3)
    await wait_isr(cluster, env.topic, 3)


async def test_leader_failover_mid_stream_loses_nothing(
    cluster: DevStack, fake_api: FakeEmbeddingServer
) -> None:
    """The victim leads the dead-letter partition and input partitions: the idempotent
    producer's retries across the failover write no dead letter twice."""
    broker = kafka(cluster)
    env = await make_env(cluster)
    await wait_isr(cluster, env.topic, 3)
    await wait_isr(cluster, env.dlq, 3)
    fake_api.configure(latency_ms=30)
    await migrate_db(env, DIM)
    records, texts = corpus(5_000, bad_every=50)
    first, second = records[:3_500], records[3_500:]
    positions = await env.produce_records(first)
    led = Counter(p["leader"] for p in await partitions(cluster, env.topic))
    (dlq_partition,) = await partitions(cluster, env.dlq)
    victim = dlq_partition["leader"]
    victim_led = led[victim]
    # <= 4 requests x 10 texts per 30 ms: the kill lands mid-stream on a fast machine too.
    async with running(env.settings(provider(fake_api, max_concurrency=4))) as worker:

        async def moved(than: int = 0) -> bool:
            return await stored_total(env) > than

        await wait_until(moved, 60, "no progress before the kill")
        await broker.kill(victim)
        at_kill = await stored_total(env)
        assert at_kill < len(first), "the stream ended before the kill"

        async def failed_over() -> bool:
            return victim not in [p["leader"] for p in await partitions(cluster, env.topic)]

        await wait_until(failed_over, 60, f"node {victim} still leads after its kill")
        positions += await env.produce_records(second)  # while it is down: acks from two
        await wait_until(lambda: moved(at_kill), 60, "no progress with the leader down")
        await asyncio.sleep(2)
        await broker.restart(victim)
        await env.wait_for_offsets(highest(positions), seconds=180)
        stats = worker.pipeline.stats if worker.pipeline else None
    assert stats is not None and victim_led >= 1
    bad = {positions[i] for i in range(49, 5_000, 50)}
    await check_store(env, texts)
    assert await env.stored_offsets() == {p: h + 1 for p, h in highest(positions).items()}
    await check_letters(env, bad)
    assert stats.stored == len(texts) and sum(stats.dead_lettered.values()) == len(bad)
