"""Memory under a large backlog and a slow provider: backpressure keeps it flat.

The default run uses a 40,000-event backlog of ~2 kB events (80 MB of raw values, CI);
``EMBEDDING_WORKER_SOAK_EVENTS=200000`` runs the full soak (400 MB). The bound: resident memory
of the worker process stays under ``RSS_BOUND_MB`` (about the interpreter and libraries, the
in-flight window of ``max_in_flight`` events and Kafka fetch buffers) -- less than the backlog
itself, so the worker cannot be holding it -- and the last third of the samples may not
exceed the middle third by more than ``GROWTH_BOUND_MB``.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from fakeapi import FakeEmbeddingServer
from tests.conftest import Env, dashscope, migrate_db, wait_until
from tests.processes import WorkerProcess

EVENTS = int(os.environ.get("EMBEDDING_WORKER_SOAK_EVENTS", "40000"))
RSS_BOUND_MB = 160.0
GROWTH_BOUND_MB = 25.0
SAMPLE_FOR_S = float(os.environ.get("EMBEDDING_WORKER_SOAK_SECONDS", "20"))


async def test_backlog_memory_stays_flat(
    env: Env, fake_api: FakeEmbeddingServer, tmp_path: Path
) -> None:
    # 10 texts/s per connection, 1,280/s at the default concurrency ceiling (128): the 20 s
    # of samples end before the backlog does (at 250 ms the AIMD limit drained it).
    fake_api.configure(latency_ms=1000)
    await migrate_db(env, 256)
    filler = "lorem ipsum dolor sit amet " * 75  # ~2 kB texts
    await env.produce_raw(
        (
            f"doc-{i}".encode(),
            json.dumps({"id": f"doc-{i}", "text": f"{i} {filler}"}).encode(),
        )
        for i in range(EVENTS)
    )
    worker = await WorkerProcess(
        env.worker_env(dashscope(fake_api, 256), batch={"max_in_flight": 2000}),
        tmp_path / "worker.log",
    ).start()

    async def progressing() -> bool:
        return sum((await env.stored_offsets()).values()) > 0

    await wait_until(progressing, 60, "no progress")
    samples: list[float] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + SAMPLE_FOR_S
    while loop.time() < end:
        samples.append(worker.rss_mb())
        await asyncio.sleep(0.25)
    stored = sum((await env.stored_offsets()).values())
    assert await worker.terminate() == 0
    assert 0 < stored < EVENTS, "the backlog must still be there while memory is sampled"
    assert '"pipeline full, partitions paused"' in worker.log()
    third = len(samples) // 3
    middle, last = max(samples[third : 2 * third]), max(samples[2 * third :])
    print(f"backlog {EVENTS}: rss max {max(samples):.1f} MB, middle {middle:.1f}, last {last:.1f}")
    assert max(samples) < RSS_BOUND_MB
    assert last - middle < GROWTH_BOUND_MB
