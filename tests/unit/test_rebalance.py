"""A rebalance that completes while one partition of a fetch is being ingested.

Real pipeline code; the consumer, Postgres and the provider are small fakes so the race
can be staged exactly (found in review: records of the old assignment were accepted into
the new one and an offset was stored past 100 unstored events)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from tests.pipeline_fakes import P0, P1, FakeConsumer, FakeStore, Msg, NoDeadLetters, T
from worker.config import load_settings
from worker.embedding.providers.base import Embedder, Embeddings
from worker.events import TextType
from worker.pipeline import runner as pl
from worker.sinks.postgres import WriteResult


class GatedEmbedder(Embedder):
    model, dimension, max_texts = "m", 4, 10

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def embed(self, texts: Any, text_type: TextType) -> Embeddings:
        await self.gate.wait()
        return Embeddings(np.ones((len(texts), 4), dtype=np.float32))


async def test_records_fetched_before_a_rebalance_are_not_taken_into_the_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    db_offsets = {0: 0, 1: 900}
    stored: set[tuple[int, int]] = set()
    lookup_open = asyncio.Event()
    lookup_open.set()

    async def load_offsets(group: str, topic: str) -> dict[int, int]:
        return dict(db_offsets)

    async def stored_hashes(keys: object) -> dict[Any, bytes]:
        await lookup_open.wait()
        return {}

    async def write(changes: Any, offsets: Any) -> WriteResult:
        stored.update((c.partition, c.offset) for c in changes)
        for (_, partition), offset in offsets.items():
            db_offsets[partition] = max(db_offsets.get(partition, 0), offset)
        return WriteResult(upserted=len(changes))

    settings = load_settings(
        kafka={"input_topic": T},
        provider={"kind": "dashscope", "api_key": "x", "dimension": 64},
        batch={"linger_ms": 10},
        http={"enabled": False},
    )
    consumer, embedder = FakeConsumer(), GatedEmbedder()
    store = FakeStore(load_offsets, stored_hashes, write)
    monkeypatch.setattr(pl.Pipeline, "REVOKE_GRACE_S", 0.1)
    p = pl.Pipeline(settings, consumer, NoDeadLetters(), store, embedder)  # type: ignore[arg-type]
    await p.on_partitions_assigned([P0, P1])
    stop = asyncio.Event()
    run = asyncio.create_task(p.run(stop))

    # p1 900..999 are in flight (embedding blocked); then a fetch with p0 and p1 records
    # whose p0 hash lookup is slow: a whole rebalance happens during that await.
    await consumer.script.put({P1: [Msg(1, o) for o in range(900, 1000)]})
    await asyncio.sleep(0.2)
    lookup_open.clear()
    await consumer.script.put({P0: [Msg(0, 0)], P1: [Msg(1, o) for o in range(1000, 1010)]})
    await asyncio.sleep(0.2)
    await p.on_partitions_revoked([P0, P1])  # the in-flight p1 events are dropped
    await p.on_partitions_assigned([P0, P1])
    lookup_open.set()
    embedder.gate.set()
    await asyncio.sleep(0.5)
    assert db_offsets[1] <= 900, "an offset was stored past events that were never stored"

    # The consumer, sought back to 900, delivers 900..1009 again: all of them are stored.
    await consumer.script.put({P1: [Msg(1, o) for o in range(900, 1010)]})
    await asyncio.sleep(0.5)
    stop.set()
    await run
    assert all((1, o) in stored for o in range(900, 1010))
    assert db_offsets[1] == 1010


async def test_while_paused_the_pipeline_polls_often_so_it_resumes_once_drained() -> None:
    """Backpressure pauses the partitions at max_in_flight; the resume check follows each
    poll, so polls while paused are short (a 200 ms one idled the provider once drained)."""
    settings = load_settings(
        kafka={"input_topic": T},
        provider={"kind": "dashscope", "api_key": "x", "dimension": 64},
        batch={"linger_ms": 0, "max_in_flight": 20},
        http={"enabled": False},
    )
    consumer, embedder = FakeConsumer(), GatedEmbedder()
    p = pl.Pipeline(settings, consumer, NoDeadLetters(), FakeStore(), embedder)  # type: ignore[arg-type]
    await p.on_partitions_assigned([P0, P1])
    stop = asyncio.Event()
    run = asyncio.create_task(p.run(stop))
    await consumer.script.put({P0: [Msg(0, o) for o in range(30)]})
    await asyncio.sleep(0.3)  # embedding is held: 30 in flight, over the 20 allowed
    assert p._paused
    consumer.timeouts.clear()
    await asyncio.sleep(0.3)
    assert consumer.timeouts and max(consumer.timeouts) <= pl.Pipeline.PAUSED_POLL_MS
    embedder.gate.set()  # drained: resumed at the next poll, and long polls again
    await asyncio.sleep(0.3)
    assert not p._paused
    consumer.timeouts.clear()
    await asyncio.sleep(0.5)
    assert max(consumer.timeouts) == 200
    stop.set()
    await run
