"""EmbedStage against the fake API misbehaving: throttling, 5xx, timeouts, resets, outages and
a revoked key. Several ``run`` calls share one stage, as the pipeline's embedding tasks do."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import numpy as np
import pytest
from structlog.testing import capture_logs

from fakeapi import FakeEmbeddingServer, fake_vector
from tests.conftest import API_KEY
from tests.factories import stage_for as stage_with
from tests.factories import upsert
from worker.embedding.providers.base import ConfigurationFault
from worker.embedding.stage import BatchOutcome, EmbedStage
from worker.model import Change

T = TypeVar("T")
DIM = 64
FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05}


def changes(n: int, prefix: str = "doc") -> list[Change]:
    return [
        upsert(
            i,
            f"{prefix} {i}: a short text about the weather in town number {i}",
            id=f"{prefix}-{i}",
        )
        for i in range(n)
    ]


def breaker_state(stage: EmbedStage) -> str:
    return stage.breaker.state  # via a function: mypy would keep a narrowed literal


def batches(items: list[Change], size: int = 10) -> list[list[Change]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def stage_for(fake: FakeEmbeddingServer, **extra: Any) -> AbstractAsyncContextManager[EmbedStage]:
    return stage_with(fake, DIM, **{**FAST, **extra})


async def run_all(
    stage: EmbedStage, items: list[Change], size: int = 10
) -> list[BatchOutcome[Change]]:
    return list(await asyncio.gather(*(stage.run(b) for b in batches(items, size))))


def assert_all_embedded(items: list[Change], outcomes: list[BatchOutcome[Change]]) -> None:
    embedded = [c for o in outcomes for c in o.embedded]
    assert sorted(c.id for c in embedded) == sorted(c.id for c in items)
    assert all(not o.refused for o in outcomes)
    for c in items:
        assert c.vector is not None
        np.testing.assert_allclose(c.vector, fake_vector(c.text, DIM), atol=1e-6)


@contextlib.asynccontextmanager
async def background(coro: Coroutine[Any, Any, T]) -> AsyncIterator[asyncio.Task[T]]:
    """A task that is cancelled if the test leaves early (so a failure does not leak it)."""
    task = asyncio.ensure_future(coro)
    try:
        yield task
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def eventually(
    condition: Callable[[], bool], seconds: float = 3.0, message: str = "condition never held"
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(message)
        await asyncio.sleep(0.005)


# (a) ----------------------------------------------------------------------------------------


async def test_everything_is_embedded_through_a_storm_of_transient_faults(
    fake_api: FakeEmbeddingServer,
) -> None:
    fake_api.configure(
        rate_429=0.15,
        rate_429_no_retry_after=0.15,
        retry_after_s=0.02,
        rate_500=0.05,
        rate_timeout=0.05,
        timeout_sleep_s=1.0,
        rate_reset=0.05,
        shuffle=True,
    )
    items = changes(300)
    with capture_logs() as logs:
        async with stage_for(
            fake_api, timeout_s=0.3, max_concurrency=8, breaker_cooldown_s=0.1
        ) as stage:
            outcomes = await run_all(stage, items)
    assert_all_embedded(items, outcomes)

    by_cause: Counter[str] = sum((o.retries_by_cause for o in outcomes), Counter())
    stats = fake_api.stats()
    # Every failure the fake injected was retried, under the right cause.
    assert by_cause["429"] == stats["by_status"].get(429, 0) == stats["throttled"] > 0
    assert by_cause["500"] == stats["by_status"].get(500, 0)
    # >=: on a starved machine a slow answer can time out too, not only the injected ones.
    assert by_cause["Timeout"] >= stats["timeouts"]
    assert by_cause["ConnectionError"] == stats["resets"]
    assert set(by_cause) - {"429"}, "only 429s were retried: the other faults never fired"
    assert sum(o.retries for o in outcomes) == sum(by_cause.values())
    assert sum(o.throttled for o in outcomes) == by_cause["429"]
    assert sum(o.requests for o in outcomes) == stats["requests"] == 30 + sum(by_cause.values())

    retried = [e for e in logs if e["event"] == "embedding request failed, retrying"]
    assert len(retried) == sum(by_cause.values())
    assert all(e["log_level"] == "warning" and e["cause"] for e in retried)
    assert API_KEY not in repr(logs)


# (b) ----------------------------------------------------------------------------------------


async def test_rpm_limiter_keeps_the_provider_from_throttling(
    fake_api: FakeEmbeddingServer,
) -> None:
    items = changes(36)
    # Control: the same load with no client limit runs into the fake's quota.
    fake_api.configure(rpm=1200, retry_after_s=0.01)  # 20/s, burst 20
    async with stage_for(fake_api) as stage:
        assert_all_embedded(items, await run_all(stage, items, size=1))
    assert fake_api.stats()["throttled"] >= 5

    fake_api.configure(rpm=1199)  # a fresh quota bucket on the fake
    fake_api.reset_stats()
    items = changes(36, prefix="limited")
    async with stage_for(fake_api, rpm=960) as stage:  # 16/s, burst 16
        outcomes = await run_all(stage, items, size=1)
    assert_all_embedded(items, outcomes)
    # Near zero: loopback scheduling jitter can bunch two sends, never a wave.
    assert fake_api.stats()["throttled"] <= 1
    assert fake_api.stats()["requests"] <= 37


# (c) ----------------------------------------------------------------------------------------


async def test_adaptive_concurrency_backs_off_when_throttled(
    fake_api: FakeEmbeddingServer,
) -> None:
    fake_api.configure(rate_429=1.0, retry_after_s=0.01)
    items = changes(80)
    async with stage_for(fake_api, max_concurrency=8) as stage:
        assert stage.concurrency.limit == 8
        async with background(run_all(stage, items)) as task:
            await eventually(lambda: stage.concurrency.limit < 8, 2.0, "the limit never dropped")
            lowered = stage.concurrency.limit
            # Requests of the first wave (sent at limit 8) may still be on the wire.
            await eventually(lambda: stage.concurrency.in_flight <= lowered)

            # Recovery: the gate holds in-flight requests at the lowered limit, which then
            # grows by one per round of successes.
            fake_api.configure(rate_429=0.0, latency_ms=100)
            fake_api.reset_stats()
            outcomes = await asyncio.wait_for(task, 5)
    assert_all_embedded(items, outcomes)
    in_flight = fake_api.stats()["max_in_flight"]
    assert in_flight < 8, "the fake saw more parallel requests than the lowered limit"
    assert in_flight <= stage.concurrency.limit
    assert stage.concurrency.limit > lowered
    assert sum(o.throttled for o in outcomes) >= 1


# (d) ----------------------------------------------------------------------------------------


async def test_breaker_stops_requests_during_an_outage_and_recovers(
    fake_api: FakeEmbeddingServer,
) -> None:
    fake_api.configure(rate_500=1.0)
    items = changes(30)
    async with stage_for(fake_api, breaker_failures=3, breaker_cooldown_s=0.6) as stage:
        async with background(run_all(stage, items)) as task:
            await eventually(lambda: breaker_state(stage) == "open")
            await asyncio.sleep(0.1)  # let requests already on the wire land
            before = fake_api.stats()["requests"]
            await asyncio.sleep(0.3)
            assert fake_api.stats()["requests"] == before, "sent while the breaker is open"
            assert breaker_state(stage) == "open" and not task.done()

            # The cool-down ends: exactly one probe, which fails and re-opens the breaker.
            await eventually(lambda: fake_api.stats()["requests"] > before, 1.0)
            await asyncio.sleep(0.1)
            assert fake_api.stats()["requests"] == before + 1
            assert breaker_state(stage) == "open"

            fake_api.configure(rate_500=0.0)
            outcomes = await asyncio.wait_for(task, 3)
        assert breaker_state(stage) == "closed"
    assert_all_embedded(items, outcomes)
    assert sum(o.retries_by_cause["500"] for o in outcomes) >= 4


# (e) ----------------------------------------------------------------------------------------


async def test_auth_fault_holds_the_work_until_the_key_works_again(
    fake_api: FakeEmbeddingServer,
) -> None:
    fake_api.configure(auth_fault=True)
    items = changes(30)
    async with (
        stage_for(fake_api, auth_retry_s=0.05) as stage,
        background(run_all(stage, items)) as task,
    ):
        await eventually(lambda: stage.fault is not None)
        assert stage.fault is not None and stage.fault.code == "InvalidApiKey"
        before = fake_api.stats()["requests"]
        await asyncio.sleep(0.5)
        assert not task.done()
        during = fake_api.stats()["requests"] - before
        # One call re-tries every auth_retry_s; the other batches wait, not hammer.
        assert 3 <= during <= 0.5 / 0.05 + 2
        assert breaker_state(stage) == "closed"  # a 401 is an answer, not an outage

        fake_api.configure(auth_fault=False)
        outcomes = await asyncio.wait_for(task, 3)
    assert_all_embedded(items, outcomes)
    assert stage.fault is None
    assert sum(o.retries_by_cause["401"] for o in outcomes) >= 3


async def test_auth_fault_retrying_passes_to_another_call_when_cancelled(
    fake_api: FakeEmbeddingServer,
) -> None:
    fake_api.configure(auth_fault=True)
    first, second = changes(10, "first"), changes(10, "second")
    async with (
        stage_for(fake_api, auth_retry_s=0.05) as stage,
        background(stage.run(first)) as owner,
    ):
        await eventually(lambda: stage.fault is not None)
        async with background(stage.run(second)) as waiter:
            await asyncio.sleep(0.1)
            owner.cancel()  # e.g. its partition was revoked
            await asyncio.sleep(0.1)
            before = fake_api.stats()["requests"]
            await asyncio.sleep(0.2)
            assert fake_api.stats()["requests"] > before, "nobody re-tries any more"
            fake_api.configure(auth_fault=False)
            outcome = await asyncio.wait_for(waiter, 2)
    assert_all_embedded(second, [outcome])
    assert stage.fault is None


async def test_auth_fault_exit_mode_raises_after_one_request(
    fake_api: FakeEmbeddingServer,
) -> None:
    fake_api.configure(auth_fault=True)
    async with stage_for(fake_api, on_auth_fault="exit") as stage:
        with pytest.raises(ConfigurationFault) as err:
            await stage.run(changes(10))
    assert err.value.code == "InvalidApiKey"
    assert fake_api.stats()["requests"] == 1
    assert stage.fault is None


async def test_wrong_dimension_still_raises_in_wait_mode(fake_api: FakeEmbeddingServer) -> None:
    # Only a new configuration fixes this one: waiting would hide it.
    fake_api.configure(allowed_dimensions=(1024,))
    async with stage_for(fake_api, on_auth_fault="wait") as stage:
        with pytest.raises(ConfigurationFault):
            await stage.run(changes(10))
    assert fake_api.stats()["requests"] == 1
    assert stage.fault is None
