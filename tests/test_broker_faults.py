"""The broker fails while events flow (Apache Kafka only: Tansu keeps nothing across a
restart and has no replicas). The worker runs on without being restarted, and every event
ends up stored once or dead-lettered: none lost, none applied twice (row versions stay 1)."""

from __future__ import annotations

import asyncio

import pytest

from fakeapi import FakeEmbeddingServer
from tests.conftest import Env, highest, migrate_db, running, wait_until
from tests.test_crashes import DIM, check_store, corpus, provider, stored_total
from worker.devstack import DevStack
from worker.devstack.kafka import KafkaBroker

pytestmark = pytest.mark.kafka_only


def kafka(stack: DevStack) -> KafkaBroker:
    assert isinstance(stack.broker, KafkaBroker)
    return stack.broker


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
    async with running(env.settings(provider(fake_api))) as worker:

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
