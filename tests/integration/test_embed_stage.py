"""EmbedStage: bisect permanent refusals down to the bad items; retry transient errors."""

from __future__ import annotations

import asyncio
import math
from contextlib import AbstractAsyncContextManager
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

import worker.backoff
from fakeapi import FakeEmbeddingServer, fake_vector
from tests.factories import stage_for as stage_with
from tests.factories import upsert
from worker.embedding.providers.base import ConfigurationFault, TransientError
from worker.embedding.stage import EmbedStage, stated_limit
from worker.events import TextType
from worker.model import Change

DIM = 256
POISON = "xx-poison-xx"
FAST = {"backoff_initial_s": 0.001, "backoff_max_s": 0.004}


def changes(
    n: int, poison_at: tuple[int, ...] = (), text_type: TextType = TextType.DOCUMENT
) -> list[Change]:
    return [
        upsert(
            i,
            f"document number {i} about the weather" + (f" {POISON}" if i in poison_at else ""),
            text_type=text_type,
        )
        for i in range(n)
    ]


def stage_for(fake: FakeEmbeddingServer, **extra: Any) -> AbstractAsyncContextManager[EmbedStage]:
    return stage_with(fake, DIM, **{**FAST, **extra})


def assert_right_vectors(items: list[Change]) -> None:
    for c in items:
        assert c.vector is not None
        np.testing.assert_allclose(c.vector, fake_vector(c.text, DIM), atol=1e-6)


async def test_clean_batch_is_one_request(fake_api: FakeEmbeddingServer) -> None:
    items = changes(10)
    async with stage_for(fake_api) as stage:
        outcome = await stage.run(items)
    assert outcome.embedded == items and outcome.refused == []
    assert (outcome.requests, outcome.retries) == (1, 0)
    assert_right_vectors(outcome.embedded)


@pytest.mark.parametrize("poison", [0, 3, 4, 5, 9])
async def test_bisection_isolates_one_poison_item(
    fake_api: FakeEmbeddingServer, poison: int
) -> None:
    fake_api.configure(poison=[POISON], shuffle=True)
    items = changes(10, poison_at=(poison,))
    async with stage_for(fake_api) as stage:
        outcome = await stage.run(items)
    assert sorted(c.offset for c in outcome.embedded) == [i for i in range(10) if i != poison]
    assert_right_vectors(outcome.embedded)
    assert len(outcome.refused) == 1
    refused, error = outcome.refused[0]
    assert refused is items[poison] and refused.vector is None
    assert error.code == "DataInspectionFailed"
    assert outcome.requests <= 2 * math.ceil(math.log2(10)) + 1
    assert outcome.requests == fake_api.stats()["requests"]
    assert outcome.retries == 0


async def test_bisection_isolates_two_poison_items(fake_api: FakeEmbeddingServer) -> None:
    fake_api.configure(poison=[POISON])
    items = changes(10, poison_at=(2, 7))
    async with stage_for(fake_api) as stage:
        outcome = await stage.run(items)
    assert sorted(c.offset for c, _ in outcome.refused) == [2, 7]
    assert all(e.code == "DataInspectionFailed" for _, e in outcome.refused)
    assert sorted(c.offset for c in outcome.embedded) == [0, 1, 3, 4, 5, 6, 8, 9]
    assert_right_vectors(outcome.embedded)
    assert outcome.requests <= 2 * (2 * math.ceil(math.log2(10)) + 1)


async def test_single_poison_item_costs_one_request(fake_api: FakeEmbeddingServer) -> None:
    fake_api.configure(poison=[POISON])
    async with stage_for(fake_api) as stage:
        outcome = await stage.run(changes(1, poison_at=(0,)))
    assert outcome.embedded == [] and len(outcome.refused) == 1
    assert outcome.requests == 1


# 25 one-letter words: 49 bytes, estimated 19 tokens, but 25 for the fake's count (a word each).
UNDERCOUNTED = " ".join("abcdefghijklmnopqrstuvwxy")


@pytest.mark.parametrize("batch", [1, 10])
async def test_text_refused_as_too_long_is_cut_again_and_embedded(
    fake_api: FakeEmbeddingServer, batch: int
) -> None:
    fake_api.configure(max_tokens=20)
    items = [upsert(0, UNDERCOUNTED), *changes(batch)[1:]]
    assert items[0].tokens <= 20
    async with stage_for(fake_api, max_tokens_per_text=20) as stage:
        with capture_logs() as logs:
            outcome = await stage.run(items)
    assert outcome.refused == []
    assert sorted(c.offset for c in outcome.embedded) == list(range(batch))
    cut = items[0]
    assert cut.truncated and UNDERCOUNTED.startswith(cut.text) and cut.text != UNDERCOUNTED
    assert_right_vectors(outcome.embedded)  # the vector is the cut text's
    assert [e["event"] for e in logs].count(
        "provider refused a text as too long; embedding a shorter prefix"
    ) == 1


async def test_text_refused_as_too_long_is_refused_when_recut_is_off(
    fake_api: FakeEmbeddingServer,
) -> None:
    fake_api.configure(max_tokens=20)
    async with stage_for(fake_api, max_tokens_per_text=20) as stage:
        stage.recut = False  # oversize_policy = reject
        outcome = await stage.run([upsert(0, UNDERCOUNTED)])
    assert outcome.embedded == [] and len(outcome.refused) == 1
    assert "input length" in outcome.refused[0][1].message
    assert outcome.refused[0][0].text == UNDERCOUNTED


async def test_too_many_inputs_lowers_the_batch_size_once_and_refuses_nothing(
    fake_api: FakeEmbeddingServer,
) -> None:
    """Five batches of 10 in parallel against a server that takes 4: one lowering (one log
    line), every text embedded once, none refused; later batches go out at 4 from the start."""
    fake_api.configure(max_texts=4)
    items = changes(60)
    told: list[int] = []
    with capture_logs() as logs:
        async with stage_for(fake_api) as stage:
            stage.on_max_texts = told.append
            outcomes = await asyncio.gather(
                *(stage.run(items[i : i + 10]) for i in range(0, 50, 10))
            )
            assert stage.max_texts == stage.embedder.max_texts == 4
            before = fake_api.stats()["by_status"].get(400, 0)
            outcomes.append(await stage.run(items[50:]))
    assert all(not o.refused for o in outcomes)
    assert sorted(c.id for o in outcomes for c in o.embedded) == sorted(c.id for c in items)
    assert_right_vectors(items)
    assert told == [4]
    lowered = [e for e in logs if e["event"].startswith("provider takes fewer texts")]
    assert [(e["max_texts"], e["was"]) for e in lowered] == [(4, 10)]
    stats = fake_api.stats()
    assert stats["texts"] == 60
    assert stats["by_status"].get(400, 0) == before, (
        "a batch of 10 after the lowering is split first"
    )


@pytest.mark.parametrize(
    ("message", "sent", "expected"),
    [
        ("batch size is invalid, it should not be larger than 10.", 32, 10),
        ("batch size 64 > maximum allowed batch size 32", 64, 32),
        ("HTTP 413 Validation: batch size 1000 > maximum allowed batch size 256", 1000, 256),
        ("too many inputs", 32, None),  # unstated: the stage halves
        ("at most 100 inputs", 32, None),  # not below what was sent: no limit learned
    ],
)
def test_stated_limit(message: str, sent: int, expected: int | None) -> None:
    assert stated_limit(message, sent) == expected


async def test_transient_errors_are_retried(
    fake_api: FakeEmbeddingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_api.configure(rate_429=0.5, retry_after_s=0.002)
    delays: list[tuple[float | None, float]] = []

    jittered = worker.backoff.jittered

    def recording_backoff(
        attempt: int, initial: float, cap: float, retry_after: float | None
    ) -> float:
        delay = jittered(attempt, initial, cap, retry_after)
        delays.append((retry_after, delay))
        return delay

    monkeypatch.setattr(worker.backoff, "jittered", recording_backoff)
    outcomes = []
    async with stage_for(fake_api) as stage:
        for start in range(0, 30, 10):
            outcomes.append(await stage.run(changes(30)[start : start + 10]))
    assert all(len(o.embedded) == 10 and not o.refused for o in outcomes)
    for o in outcomes:
        assert_right_vectors(o.embedded)
    retries = sum(o.retries for o in outcomes)
    assert retries > 0
    assert retries == fake_api.stats()["throttled"] == len(delays)
    assert sum(o.requests for o in outcomes) == 3 + retries
    # The fake's Retry-After reached the backoff, and was honoured.
    assert all(ra == 0.002 and d >= 0.002 for ra, d in delays)


async def test_max_retries_gives_up_after_limit_plus_one_requests(
    fake_api: FakeEmbeddingServer,
) -> None:
    fake_api.configure(rate_500=1.0)
    async with stage_for(fake_api, max_retries=2) as stage:
        with pytest.raises(TransientError) as err:
            await stage.run(changes(3))
    assert err.value.code == "InternalError"
    assert fake_api.stats()["requests"] == 3
    assert fake_api.stats()["by_status"] == {500: 3}


async def test_max_retries_zero_means_one_request(fake_api: FakeEmbeddingServer) -> None:
    fake_api.configure(rate_reset=1.0)
    async with stage_for(fake_api, max_retries=0) as stage:
        with pytest.raises(TransientError):
            await stage.run(changes(2))
    assert fake_api.stats()["requests"] == 1


async def test_configuration_fault_propagates_without_retry(fake_api: FakeEmbeddingServer) -> None:
    async with stage_for(fake_api, api_key="sk-wrong", on_auth_fault="exit") as stage:
        with pytest.raises(ConfigurationFault):
            await stage.run(changes(10))
    assert fake_api.stats()["requests"] == 1


async def test_configuration_fault_is_not_bisected(fake_api: FakeEmbeddingServer) -> None:
    # A dimension problem is a 400 too, but no split can fix it.
    fake_api.configure(allowed_dimensions=(1024,))
    async with stage_for(fake_api) as stage:
        with pytest.raises(ConfigurationFault):
            await stage.run(changes(10))
    assert fake_api.stats()["requests"] == 1


async def test_query_batches_are_sent_as_queries(
    fake_api: FakeEmbeddingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[TextType] = []
    async with stage_for(fake_api) as stage:
        original = stage.embedder.embed

        async def spy(texts: Any, text_type: TextType) -> Any:
            seen.append(text_type)
            return await original(texts, text_type)

        monkeypatch.setattr(stage.embedder, "embed", spy)
        outcome = await stage.run(changes(3, text_type=TextType.QUERY))
    assert seen == [TextType.QUERY] and len(outcome.embedded) == 3
