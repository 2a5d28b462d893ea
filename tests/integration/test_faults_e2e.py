"""The whole worker against a misbehaving provider: throttling, errors, a revoked key."""

from __future__ import annotations

import asyncio

import numpy as np

from fakeapi import FakeEmbeddingServer, fake_vector
from tests.conftest import Env, dashscope, migrate_db, running, wait_until


def _events(n: int) -> list[dict[str, object]]:
    return [{"id": f"e-{i}", "text": f"event number {i} in a flaky world"} for i in range(n)]


async def _vectors_ok(env: Env, n: int) -> None:
    conn = await env.connect()
    try:
        rows = await conn.fetch("SELECT id, content, embedding, version FROM embeddings")
    finally:
        await conn.close()
    assert len(rows) == n
    for r in rows:
        assert r["version"] == 1
        assert np.allclose(r["embedding"].to_numpy(), fake_vector(r["content"], 256))


async def test_throttling_errors_timeouts_and_resets_lose_nothing(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    fake_api.configure(
        rate_429=0.15,
        rate_429_no_retry_after=0.15,
        retry_after_s=0.05,
        rate_500=0.05,
        rate_timeout=0.02,
        timeout_sleep_s=2.0,
        rate_reset=0.02,
        seed=3,
    )
    await migrate_db(env, 256)
    high = await env.produce(_events(1500))
    provider = dashscope(fake_api, timeout_s=0.5, breaker_cooldown_s=0.2)
    async with running(env.settings(provider)) as worker:
        await env.wait_for_offsets(high, seconds=120)
        assert worker.pipeline is not None
        stats = worker.pipeline.stats
    letters = await env.dead_letters(expected=0, seconds=1)
    assert letters == [], "a provider fault must never dead-letter good data"
    await _vectors_ok(env, 1500)
    fake = fake_api.stats()
    assert fake["throttled"] > 0 and fake["by_status"].get(500, 0) > 0
    assert fake["resets"] > 0 and fake["timeouts"] > 0
    # What the worker saw and did about it is visible in its own counters.
    assert stats.retries_by_cause["429"] > 0
    assert stats.retries_by_cause["500"] > 0
    assert stats.retries >= fake["throttled"]


async def test_bad_api_key_holds_everything_until_fixed(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    fake_api.configure(auth_fault=True)
    await migrate_db(env, 256)
    high = await env.produce(_events(200))
    provider = dashscope(fake_api, auth_retry_s=0.3)
    async with running(env.settings(provider)) as worker:
        pipeline = worker.pipeline
        assert pipeline is not None

        async def faulted() -> bool:
            return not pipeline.ready and pipeline.stage.fault is not None

        await wait_until(faulted, 30, "readiness did not report the auth fault")
        await asyncio.sleep(1.0)  # several probes while the key is still refused
        assert await env.stored_offsets() == {}, "nothing may be committed during the fault"
        assert await env.kafka_committed() == {}
        assert pipeline.stats.texts_embedded == 0

        fake_api.configure(auth_fault=False)
        await env.wait_for_offsets(high, seconds=60)
        assert pipeline.ready and pipeline.stage.fault is None
    assert await env.dead_letters(expected=0, seconds=1) == []
    await _vectors_ok(env, 200)
