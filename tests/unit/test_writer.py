"""The writer: natural batching and Kafka commits off its path.

Real pipeline code around a fake consumer and a store whose write the test holds open, so
what goes into each transaction is observed exactly (no timing is asserted).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from tests.conftest import wait_until
from tests.pipeline_fakes import P0, FakeConsumer, FakeStore, Msg, NoDeadLetters, T
from worker.config import load_settings
from worker.embedding.providers.base import Embedder, Embeddings
from worker.events import TextType
from worker.pipeline import runner as pl
from worker.sinks.postgres import WriteResult


class InstantEmbedder(Embedder):
    model, dimension, max_texts = "m", 4, 1

    async def embed(self, texts: Any, text_type: TextType) -> Embeddings:
        return Embeddings(np.ones((len(texts), 4), dtype=np.float32))


class HeldWrites:
    """``store.write`` that records each transaction's offsets and waits for ``gate``."""

    def __init__(self) -> None:
        self.transactions: list[list[int]] = []
        self.stored: dict[int, int] = {}
        self.gate = asyncio.Event()
        self.gate.set()

    async def write(self, changes: Any, offsets: Any) -> WriteResult:
        self.transactions.append([c.offset for c in changes])
        await self.gate.wait()
        for (_, partition), offset in offsets.items():
            self.stored[partition] = max(self.stored.get(partition, 0), offset)
        return WriteResult(upserted=len(changes))


async def until(check: Callable[[], bool], what: str) -> None:
    """Wait for a condition that needs no more than a few loop turns (a generous bound)."""

    async def holds() -> bool:
        return check()

    await wait_until(holds, 10, what)


@pytest.fixture
def writes() -> HeldWrites:
    return HeldWrites()


async def started(
    consumer: FakeConsumer, writes: HeldWrites, write_max_rows: int
) -> tuple[pl.Pipeline, asyncio.Event, Callable[[], Awaitable[None]]]:
    settings = load_settings(
        kafka={"input_topic": T},
        provider={"kind": "dashscope", "api_key": "x", "dimension": 64},
        batch={"linger_ms": 0, "write_max_rows": write_max_rows},
        http={"enabled": False},
    )
    store = FakeStore(write=writes.write)
    p = pl.Pipeline(settings, consumer, NoDeadLetters(), store, InstantEmbedder())  # type: ignore[arg-type]
    await p.on_partitions_assigned([P0])
    stop = asyncio.Event()
    run = asyncio.create_task(p.run(stop))

    async def finish() -> None:
        stop.set()
        await run

    return p, stop, finish


async def test_an_idle_writer_writes_at_once_and_rows_gather_while_it_is_busy(
    writes: HeldWrites,
) -> None:
    consumer = FakeConsumer()
    p, _, finish = await started(consumer, writes, write_max_rows=3)
    writes.gate.clear()
    await consumer.script.put({P0: [Msg(0, 0)]})
    # Nothing else is coming: an idle writer must not wait to fill the transaction.
    await until(lambda: writes.transactions == [[0]], "the first event's transaction")

    # While that transaction runs, five more events are embedded and wait for the writer.
    await consumer.script.put({P0: [Msg(0, o) for o in range(1, 6)]})
    await until(lambda: len(p.writer.ready) == 5, "five rows ready behind the running transaction")
    assert writes.transactions == [[0]]
    writes.gate.set()
    await until(lambda: writes.stored.get(0) == 6, "everything stored")
    await finish()
    # The rows that gathered go in together, at most write_max_rows per transaction.
    assert writes.transactions == [[0], [1, 2, 3], [4, 5]]


async def test_the_writer_does_not_wait_for_kafka_commits(writes: HeldWrites) -> None:
    """Kafka's copy of the offsets is for lag monitoring only: a slow commit holds no write,
    and what was stored is committed when the pipeline stops."""
    consumer = FakeConsumer()
    consumer.commit_gate.clear()
    _, _, finish = await started(consumer, writes, write_max_rows=500)
    await consumer.script.put({P0: [Msg(0, 0)]})
    await until(lambda: writes.stored.get(0) == 1, "the first event stored")
    await consumer.script.put({P0: [Msg(0, 1), Msg(0, 2)]})
    await until(lambda: writes.stored.get(0) == 3, "stored while a commit hangs")
    assert consumer.commits == []
    consumer.commit_gate.set()
    await finish()
    assert consumer.commits[-1] == {P0: 3}
