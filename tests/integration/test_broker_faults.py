"""The broker fails while events flow (Apache Kafka only: Tansu keeps nothing across a
restart and has no replicas). The worker runs on without being restarted, and every event
ends up stored once or dead-lettered: none lost, none applied twice (row versions stay 1).

One node for a restart on its own log dirs (the session's stack), three for leader failover
(this module's cluster: replication factor 3, ``min.insync.replicas=2``, producers ack all).
With analysis on, a failover of the results topic's leader loses no result, and repeats one
only for an event a rebalance handed back (results are at least once, docs/analysis.md).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from fakeapi import FakeEmbeddingServer
from tests.conftest import Env, highest, make_env, migrate_db, running, wait_until
from tests.integration.test_analysis import topics_for
from tests.integration.test_crashes import DIM, check_store, corpus, provider, stored_total
from worker.pipeline.runner import Pipeline
from worker.tools.devstack import DevStack
from worker.tools.devstack.kafka import KafkaBroker

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
    still lists it, and the admin client may pick it to ask; and a topic just created may be
    described before the broker asked knows it (an error code and no partitions)."""
    for attempt in range(20):
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka(stack).live_bootstrap())
        try:
            await admin.start()
            (described,) = await admin.describe_topics([topic])
            if described["partitions"]:
                return sorted(described["partitions"], key=lambda p: p["partition"])
            if attempt == 19:
                raise AssertionError(f"{topic} has no partitions: {described}")
        except KafkaError:
            if attempt == 19:
                raise
        finally:
            await admin.close()
        await asyncio.sleep(0.5)
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


# The corpus's events have no namespace: they are the default namespace's.
ANALYSIS = """
[namespaces.default.classify]
top_k = 2
[[namespaces.default.classify.labels]]
name = "Sports"
description = "Sports: athletes, teams, matches and tournaments."
[[namespaces.default.classify.labels]]
name = "Cooking"
description = "Cooking: recipes, ingredients and meals."
[[namespaces.default.classify.labels]]
name = "Space"
description = "Space: rockets, planets and telescopes."

[namespaces.default.anomaly]
warm_up = 40
horizon = 5
emit = "all"
"""


async def read_committed(stack: DevStack, topic: str) -> list[tuple[str, dict[str, Any]]]:
    """Every message of ``topic`` as (key, JSON value), read with ``read_committed`` up to
    the end offsets taken first (the producers are stopped by then)."""
    tps = [TopicPartition(topic, p["partition"]) for p in await partitions(stack, topic)]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka(stack).live_bootstrap(), isolation_level="read_committed"
    )
    await consumer.start()
    out: list[tuple[str, dict[str, Any]]] = []
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)

        async def read_to_end() -> None:
            while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
                batch = await consumer.getmany(*tps, timeout_ms=500)
                for messages in batch.values():
                    out.extend((m.key.decode(), json.loads(m.value)) for m in messages)

        await asyncio.wait_for(read_to_end(), 60)
    finally:
        await consumer.stop()
    return out


def repeats(messages: list[tuple[str, dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The messages of each key sent more than once, checked to be the same result: equal
    but for ``analysed_at`` (and, for an anomaly score, the position and score it was given
    again, which depend on what the replayed batch was scored with)."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    for key, message in messages:
        assert key == message["key"]
        by_key.setdefault(key, []).append(message)
    varying = {"analysed_at", "seen", "score", "novelty", "anomaly", "threshold", "warm_up"}
    varying |= {"centroid_distance", "neighbour_distance", "neighbours"}
    out = {}
    for key, sent in by_key.items():
        if len(sent) > 1:
            kept = varying if sent[0]["kind"] == "anomaly" else {"analysed_at"}
            same = [{k: v for k, v in m.items() if k not in kept} for m in sent]
            assert all(m == same[0] for m in same), f"{key} sent with different results"
            out[key] = sent
    return out


async def test_results_topic_leader_failover_with_analysis_loses_no_result(
    cluster: DevStack,
    fake_api: FakeEmbeddingServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The victim leads the classifications partition while results flow: every event has
    its classification and its anomaly score, each once unless a rebalance handed its
    partition back before its offsets were stored (then the same result again)."""
    broker = kafka(cluster)
    env = await make_env(cluster)
    topics = await topics_for(env)
    for topic in [env.topic, env.dlq, *topics.values()]:
        await wait_isr(cluster, topic, 3)
    (path := tmp_path / "analysis.toml").write_text(ANALYSIS)
    revoked: list[int] = []
    on_revoked = Pipeline.on_partitions_revoked

    async def counting(self: Pipeline, tps: list[TopicPartition]) -> None:
        revoked.extend(tp.partition for tp in tps)
        await on_revoked(self, tps)

    monkeypatch.setattr(Pipeline, "on_partitions_revoked", counting)
    fake_api.configure(latency_ms=30)
    await migrate_db(env, DIM)
    records, texts = corpus(5_000, bad_every=50)
    first, second = records[:3_500], records[3_500:]
    positions = await env.produce_records(first)
    (results_partition,) = await partitions(cluster, topics["classifications_topic"])
    victim = results_partition["leader"]
    settings = env.settings(
        provider(fake_api, max_concurrency=4), analysis={"file": str(path), **topics}
    )
    # <= 4 requests x 10 texts per 30 ms: the kill lands mid-stream on a fast machine too.
    async with running(settings) as worker:

        async def moved(than: int = 0) -> bool:
            return await stored_total(env) > than

        await wait_until(moved, 60, "no progress before the kill")
        await broker.kill(victim)
        at_kill = await stored_total(env)
        assert at_kill < len(first), "the stream ended before the kill"

        async def failed_over() -> bool:
            (p,) = await partitions(cluster, topics["classifications_topic"])
            return p["leader"] not in (victim, -1)

        await wait_until(failed_over, 60, f"node {victim} still leads after its kill")
        positions += await env.produce_records(second)
        # Offsets are stored only after their results are acknowledged: results flow.
        await wait_until(lambda: moved(at_kill), 60, "no progress with the leader down")
        await asyncio.sleep(2)
        await broker.restart(victim)
        await env.wait_for_offsets(highest(positions), seconds=240)
        assert worker.pipeline is not None and worker.pipeline.analysis is not None
        stats, analysed = worker.pipeline.stats, worker.pipeline.analysis.stats
    bad = {positions[i] for i in range(49, 5_000, 50)}
    await check_store(env, texts)
    assert await env.stored_offsets() == {p: h + 1 for p, h in highest(positions).items()}
    await check_letters(env, bad)
    assert stats.stored == len(texts)

    classified = await read_committed(cluster, topics["classifications_topic"])
    scored = [
        (key, m)
        for key, m in await read_committed(cluster, topics["anomalies_topic"])
        if m["kind"] == "anomaly"
    ]
    for messages in (classified, scored):
        assert {m["id"] for _, m in messages} == set(texts), "a result is lost"
    again = {"classifications": repeats(classified), "anomalies": repeats(scored)}
    for kind, sent in again.items():
        extra = sum(len(s) - 1 for s in sent.values())
        print(f"{kind}: {len(texts)} events, {extra} repeated; partitions revoked: {revoked}")
        # The idempotent producer writes a retried produce once: only a replay repeats.
        replays = [s[0]["source"]["partition"] in revoked for s in sent.values()]
        assert all(replays), f"{kind} repeated with no rebalance to replay them"
    assert sum(analysed.classified.values()) == len(classified)
    assert analysed.scored == len(scored)
    # The state counts every event once: one position each, all given.
    assert {m["seen"] for _, m in scored} == set(range(len(texts)))
    conn = await env.connect()
    try:
        seen = await conn.fetchval("SELECT seen FROM analysis_state WHERE namespace = 'default'")
    finally:
        await conn.close()
    assert seen == len(texts)
