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
from aiokafka import TopicPartition

from tests.conftest import wait_until
from tests.pipeline_fakes import P0, P1, FakeConsumer, FakeStore, Msg, NoDeadLetters, T
from worker.config import load_settings
from worker.embedding.providers.base import Embedder, Embeddings
from worker.events import TextType
from worker.model import Settled
from worker.ops.metrics import Metrics
from worker.pipeline import runner as pl
from worker.pipeline.offsets import OffsetTracker
from worker.pipeline.stats import Stats
from worker.pipeline.write import Writer
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
    consumer: FakeConsumer,
    writes: HeldWrites,
    write_max_rows: int,
    writers: int = 2,
    partitions: tuple[TopicPartition, ...] = (P0,),
) -> tuple[pl.Pipeline, asyncio.Event, Callable[[], Awaitable[None]]]:
    settings = load_settings(
        kafka={"input_topic": T},
        provider={"kind": "dashscope", "api_key": "x", "dimension": 64},
        batch={"linger_ms": 0, "write_max_rows": write_max_rows, "writers": writers},
        http={"enabled": False},
    )
    store = FakeStore(write=writes.write)
    p = pl.Pipeline(settings, consumer, NoDeadLetters(), store, InstantEmbedder())  # type: ignore[arg-type]
    await p.on_partitions_assigned(list(partitions))
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
    await until(
        lambda: len(p.writers[0].ready) == 5, "five rows ready behind the running transaction"
    )
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


class HeldPerPartition(HeldWrites):
    """Transactions held per partition (``gates``); each must hold one partition only."""

    def __init__(self) -> None:
        super().__init__()
        self.gates = {0: asyncio.Event(), 1: asyncio.Event()}

    async def write(self, changes: Any, offsets: Any) -> WriteResult:
        partitions = {c.partition for c in changes} | {p for _, p in offsets}
        assert len(partitions) == 1, f"one transaction spans partitions {partitions}"
        (partition,) = partitions
        self.transactions.append([c.offset for c in changes])
        await self.gates[partition].wait()
        for (_, p), offset in offsets.items():
            self.stored[p] = max(self.stored.get(p, 0), offset)
        return WriteResult(upserted=len(changes))


async def test_two_writers_store_one_partition_while_the_others_transaction_is_held() -> None:
    """``batch.writers`` 2: partitions 0 and 1 have writers of their own, so a slow
    transaction of one (an index to maintain, a lock) does not hold the other's rows or
    offsets; each transaction stores only its own partition's offsets."""
    consumer, writes = FakeConsumer(), HeldPerPartition()
    writes.gates[1].set()
    _, _, finish = await started(consumer, writes, 500, writers=2, partitions=(P0, P1))
    await consumer.script.put({P0: [Msg(0, 0)]})
    await until(lambda: writes.transactions == [[0]], "partition 0's transaction, held")
    await consumer.script.put({P1: [Msg(1, 0), Msg(1, 1)]})
    await until(lambda: writes.stored.get(1) == 2, "partition 1 stored meanwhile")
    assert 0 not in writes.stored
    writes.gates[0].set()
    await until(lambda: writes.stored.get(0) == 1, "partition 0 stored once released")
    await finish()
    committed: dict[TopicPartition, int] = {}
    for commit in consumer.commits:
        committed.update(commit)
    assert committed == {P0: 1, P1: 2}


async def test_one_writer_keeps_every_partition_in_one_queue() -> None:
    """``batch.writers`` 1: partition 1's rows wait behind partition 0's held transaction
    and go in the next one (the behaviour before parallel writers)."""
    consumer, writes = FakeConsumer(), HeldWrites()
    writes.gate.clear()
    p, _, finish = await started(consumer, writes, 500, writers=1, partitions=(P0, P1))
    await consumer.script.put({P0: [Msg(0, 0)]})
    await until(lambda: writes.transactions == [[0]], "partition 0's transaction, held")
    await consumer.script.put({P1: [Msg(1, 0)]})
    await until(lambda: len(p.writers[0].ready) == 1, "partition 1's row behind it")
    assert writes.transactions == [[0]]
    writes.gate.set()
    await until(lambda: writes.stored == {0: 1, 1: 1}, "both stored")
    await finish()


async def test_an_ordered_writer_keeps_each_partitions_stream_order() -> None:
    """With the analysis on, rows are written in stream order even when a later batch is
    embedded first: the writer holds it until the batch before it is ready."""
    writes = HeldWrites()
    tracker = OffsetTracker()
    epoch = tracker.assign((T, 0), 0)
    for offset in range(4):
        tracker.track((T, 0), offset)
    writer = Writer(
        FakeStore(write=writes.write),
        tracker,
        on_stored=lambda offsets: None,
        group_id="g",
        model="m",
        dimension=4,
        max_rows=500,
        release=lambda items: None,
        on_fatal=lambda exc: None,
        stats=Stats(),
        metrics=Metrics(),
        ordered=True,
    )
    loop = asyncio.create_task(writer.loop())
    try:
        writer.enqueue([Settled(T, 0, 2, epoch), Settled(T, 0, 3, epoch)])  # 2, 3 first
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert writes.transactions == [] and not writer.busy, "2 and 3 wait for 0 and 1"
        writer.enqueue([Settled(T, 0, 1, epoch), Settled(T, 0, 0, epoch)])
        await until(lambda: writes.stored.get(0) == 4, "all four stored")
    finally:
        loop.cancel()
    assert len(writes.transactions) == 1 and not writer.ready
