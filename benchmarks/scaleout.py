"""Scenario 8, scale-out: 1 worker process against 3 in one consumer group, one 12-partition topic.

The provider is the bound by construction: the fake answers every request after 100 ms (no
quota) and each worker may have ``max_concurrency`` 2 requests of 10 texts in flight, so one
worker embeds at most 2 x 10 / 0.1 s = 200 texts/s, a small share of a core. Three workers in
one group should then be three times as fast, if the group splits the partitions evenly and
nothing shared (the broker, Postgres, the fake, the machine) binds first: the target is
3-worker ÷ 1-worker throughput ≥ 2.7.

Each run gets a fresh topic (12 partitions), a fresh database shared by the group's workers,
and a fresh group. The workers start on the empty topic and the harness waits until the group
is Stable with every worker a member (the rebalances of the start are not measured), then
produces the events, the same count to each partition. The rate is taken between the polls
where 10 % and 90 % of the events were stored (offsets in Postgres, summed over partitions).
Lost events: produced - rows in the ``embeddings`` table (every event has its own id). The
1- and 3-worker runs alternate, so each pair saw the same machine.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from benchmarks.context import Context
from benchmarks.harness import (
    CpuWindow,
    FakeProvider,
    Figure,
    Subprocess,
    drop_database,
    events,
    fresh_database,
    log,
    median_cpu,
    stack_roots,
    unique,
)
from benchmarks.overhead import worker_config
from worker.config import environment_for
from worker.sinks import postgres as store

SCENARIO = "8-scale-out"
TARGET_SPEEDUP = 2.7
DIMENSION = 1024
PARTITIONS = 12
WORKERS = 3
LATENCY_MS = 100.0
CONCURRENCY = 2  # requests in flight per worker
TEXTS_PER_REQUEST = 10
POLL_S = 0.05


async def _until_stable(bootstrap: str, group: str, members: int, timeout_s: float) -> None:
    """Until ``group`` is Stable with ``members`` members (DescribeGroups)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    deadline = time.monotonic() + timeout_s
    seen: Any = None
    try:
        while time.monotonic() < deadline:
            for response in await admin.describe_consumer_groups([group]):
                for g in response.groups:
                    # (error_code, group_id, state, protocol_type, protocol, members, ...)
                    seen = (g[2], len(g[5]))
                    if g[0] == 0 and g[2] == "Stable" and len(g[5]) == members:
                        return
            await asyncio.sleep(0.2)
    finally:
        await admin.close()
    raise RuntimeError(f"group {group} not Stable with {members} members: (state, members) {seen}")


async def _produce_even(bootstrap: str, topic: str, n: int, prefix: str) -> int:
    """``n`` distinct upserts, partition ``i % PARTITIONS``: every partition gets the same
    count, so a member's share of the work is its share of the partitions."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, key=k, value=v, partition=i % PARTITIONS)
            for i, (k, v) in enumerate(events(n, prefix=prefix))
        ]
        await asyncio.gather(*futures)
        return len(futures)
    finally:
        await producer.stop()


def _rate(samples: list[tuple[float, int]], lo: int, hi: int) -> float:
    """Events per second between the first polls that reached ``lo`` and ``hi``."""
    t0, n0 = next((t, n) for t, n in samples if n >= lo)
    t1, n1 = next((t, n) for t, n in samples if n >= hi)
    return (n1 - n0) / max(t1 - t0, 1e-9)


async def one_run(ctx: Context, fake: FakeProvider, workers: int, i: int) -> dict[str, Any]:
    n = ctx.sizes.scaleout_events
    name = unique(f"bench_scale{workers}_r{i}")
    topic = f"bench.scaleout.{name}"
    await ctx.stack.create_topics([topic], partitions=PARTITIONS)
    dsn = await fresh_database(ctx.stack, name, DIMENSION)
    overrides = {
        "provider": {
            "max_concurrency": CONCURRENCY,
            "max_texts_per_request": TEXTS_PER_REQUEST,
        },
    }
    env = environment_for(worker_config(ctx, topic, dsn, name, fake, overrides))
    procs = [
        await Subprocess(["-m", "worker", "run"], env, ctx.work / f"{name}-w{w}.log").start()
        for w in range(workers)
    ]
    conn = await asyncpg.connect(dsn)
    try:
        await _until_stable(ctx.stack.bootstrap, name, workers, 120)
        roots = {f"worker-{w + 1}": p.pid for w, p in enumerate(procs)}
        roots.update({"fake-provider": fake.pid, **stack_roots(ctx.stack)})
        roots["harness"] = os.getpid()
        cpu = CpuWindow(roots)
        cpu.start()
        produced = await _produce_even(ctx.stack.bootstrap, topic, n, name)
        samples: list[tuple[float, int]] = []
        deadline = time.monotonic() + 600
        while True:
            stored = sum((await store.load_offsets(conn, name, topic)).values())
            samples.append((time.monotonic(), stored))
            if stored >= produced:
                break
            if exited := [p.log_path for p in procs if p.exited()]:
                raise RuntimeError(f"a worker exited early; see {exited}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"scale-out: only {stored}/{produced} stored in 600 s")
            await asyncio.sleep(POLL_S)
        usage = cpu.stop()
        rows = int(await conn.fetchval("SELECT count(*) FROM embeddings"))
    finally:
        await conn.close()
        await asyncio.gather(*(p.terminate() for p in procs))
        await drop_database(ctx.stack, name)
    rate = _rate(samples, int(0.1 * produced), int(0.9 * produced))
    return {"rate": rate, "produced": produced, "rows": rows, "lost": produced - rows, "cpu": usage}


async def run(ctx: Context) -> list[Figure]:
    fake = await FakeProvider("--latency-ms", str(LATENCY_MS)).start()
    runs = min(ctx.slow_runs, 3)
    single: list[dict[str, Any]] = []
    group: list[dict[str, Any]] = []
    try:
        for i in range(runs):
            for workers, into in ((1, single), (WORKERS, group)):
                r = await one_run(ctx, fake, workers, i)
                into.append(r)
                log(
                    f"scale-out run {i + 1}/{runs}, {workers} worker(s): {r['rate']:,.0f} "
                    f"events/s, {r['rows']}/{r['produced']} rows stored, lost {r['lost']}"
                )
    finally:
        await fake.stop()
    bound = CONCURRENCY * TEXTS_PER_REQUEST / (LATENCY_MS / 1000)
    setup = (
        f"{ctx.sizes.scaleout_events:,} events per run, {PARTITIONS} partitions (equal counts), "
        f"fake {LATENCY_MS:.0f} ms per request, no quota; each worker max_concurrency "
        f"{CONCURRENCY} × {TEXTS_PER_REQUEST} texts/request (≤ {bound:,.0f} texts/s per worker); "
        "the group Stable before the events are produced; rate between 10 % and 90 % stored"
    )
    speedups = [g["rate"] / s["rate"] for s, g in zip(single, group, strict=True)]
    lost = [float(r["lost"]) for r in single + group]
    return [
        Figure(
            SCENARIO,
            "1 worker process",
            "events/s",
            [r["rate"] for r in single],
            limit=bound,
            limit_label=f"provider bound {bound:,.0f} events/s",
            judged=False,
            cpu=median_cpu([r["cpu"] for r in single]),
            notes=setup,
        ),
        Figure(
            SCENARIO,
            f"{WORKERS} worker processes, one consumer group",
            "events/s",
            [r["rate"] for r in group],
            limit=WORKERS * bound,
            limit_label=f"provider bound {WORKERS * bound:,.0f} events/s",
            judged=False,
            cpu=median_cpu([r["cpu"] for r in group]),
        ),
        Figure(
            SCENARIO,
            f"speed-up: {WORKERS} workers ÷ 1",
            "×",
            speedups,
            limit=TARGET_SPEEDUP,
            limit_label=f"target ≥ {TARGET_SPEEDUP}×",
            notes="per interleaved pair of runs (1 worker, then 3, on the same machine state)",
        ),
        Figure(
            SCENARIO,
            "events lost (produced - rows stored), every run",
            "count",
            lost,
            limit=0.0,
            limit_label="must be 0",
            higher_is_better=False,
        ),
    ]
