"""Scenario 7, latency: event timestamp -> stored, at about half of scenario 1's capacity.

Set-up as scenario 1 (instant fake, 1024-d base64, worker defaults: ``batch.linger_ms`` 50;
``kafka.fetch_max_wait_ms`` as the stack sets it: the default 100 ms on Apache Kafka, which
answers a fetch as soon as data arrives; 10 ms on Tansu, ``TansuBroker.FETCH_MAX_WAIT_MS``), but
the topic starts empty and the harness produces at a steady rate (half of scenario 1's
median, in bursts every 10 ms: one batch per partition, round robin) while the worker runs.
Each event carries its wall-clock ``timestamp`` (ms), set as it joins its batch (before the
tick's batches are sent, so the send is inside the latency).

"Stored" is when the event's offset is visible in ``consumer_offsets`` (the worker stores it
in the transaction that stores the row): the harness polls the offsets every 10 ms, and
after the run reads ``(source_partition, source_offset, event_time)`` of every row; an
event's latency is the first poll that saw its partition's offset past it minus its
``event_time`` (so it is over-stated by up to one poll interval, ~5 ms on average).

Each run's p99 is also given for its first and second half (by event time): Tansu's
in-memory engine lists every stored batch of a partition on each fetch, so its cost grows with
the topic, and the halves show how much of the tail comes with that growth (Apache Kafka finds
a fetch offset through its index). The broker alone is measured the same way and for as long.

The target is issue 6's ``linger + 2 x provider p99``: linger is the batcher's
``batch.linger_ms`` (the only wait the worker adds by configuration: the writer writes what
is ready at once) and the provider's p99 is read from the worker's own request-latency
histogram (``/metrics``, interpolated within a bucket as Prometheus' ``histogram_quantile``
does). The broker's own delay is not in the target; it is measured beside it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from aiokafka import AIOKafkaProducer
from aiokafka.producer.message_accumulator import BatchBuilder

from benchmarks.context import Context
from benchmarks.harness import Figure, log, median_cpu, sample_texts
from benchmarks.live import LiveWorker
from benchmarks.overhead import start_py_spy, summarize_collapsed
from worker.config import BatchSettings, KafkaSettings
from worker.sinks import postgres as store
from worker.tools.devstack import free_port

SCENARIO = "7-latency"
DIMENSION = 1024
LINGER_MS = BatchSettings().linger_ms
POLL_S = 0.01
PARTITIONS = 4
TICK_S = 0.01


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' interpolation over cumulative ``(upper bound, count)`` buckets."""
    buckets = sorted(buckets)
    total = buckets[-1][1]
    if total <= 0:
        return float("nan")
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = upper, count
    return lower


def _histogram(text: str, name: str, label: str = "") -> tuple[list[tuple[float, float]], float]:
    """``(cumulative buckets, count)`` of one Prometheus histogram (lines holding ``label``)."""
    buckets, count = [], 0.0
    for line in text.splitlines():
        if label not in line:
            continue
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), float(line.rsplit(" ", 1)[1])))
        elif line.startswith(f"{name}_count"):
            count = float(line.rsplit(" ", 1)[1])
    return buckets, count


async def worker_stages(port: int) -> dict[str, float]:
    """From the worker's /metrics (seconds → ms, interpolated as ``histogram_quantile``): the
    provider's p99 (requests with outcome ok), the Postgres transactions' p50 and p99, and how
    many requests and transactions the run took (their sizes: events ÷ these counts)."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    request, requests = _histogram(text, "embedding_worker_api_request_seconds", 'outcome="ok"')
    write, writes = _histogram(text, "embedding_worker_db_write_seconds")
    return {
        "provider_p99_ms": 1000 * histogram_quantile(0.99, request),
        "write_p50_ms": 1000 * histogram_quantile(0.5, write),
        "write_p99_ms": 1000 * histogram_quantile(0.99, write),
        "requests": requests,
        "writes": writes,
    }


async def _produce_steady(
    bootstrap: str, topic: str, rate: float, seconds: float, prefix: str
) -> int:
    """Every tick, the events due, one batch per partition (round robin): per-message
    ``send`` cost the harness a fifth of a core at ~3,400 events/s, CPU the system under
    test competes for on this machine."""
    texts = sample_texts()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    # The topic's metadata before the clock starts (else the first sends wait for it).
    await producer.partitions_for(topic)
    sent = 0
    # Delivery futures not yet done. Those done are dropped as the run goes (their errors
    # raised): one gather over every send at the end blocked this loop, and with it the
    # offsets poller, for ~0.5 s, adding that to the latency of the last events.
    pending: list[asyncio.Future[Any]] = []
    try:
        t0 = time.monotonic()
        while (elapsed := time.monotonic() - t0) < seconds:
            batches: dict[int, BatchBuilder] = {}
            for _ in range(max(0, int(rate * elapsed) - sent)):
                text, metadata = texts[sent % len(texts)]
                doc_id = f"{prefix}-{sent:07d}"
                value = {
                    "id": doc_id,
                    "namespace": "bench",
                    "text": f"{text} [{sent}]",
                    "metadata": metadata,
                    "timestamp": int(time.time() * 1000),
                }
                key, raw = doc_id.encode(), json.dumps(value).encode()
                partition = sent % PARTITIONS
                if partition not in batches:
                    batches[partition] = producer.create_batch()
                batch = batches[partition]
                if batch.append(key=key, value=raw, timestamp=None) is None:  # full
                    pending.append(await producer.send_batch(batch, topic, partition=partition))
                    batches[partition] = batch = producer.create_batch()
                    batch.append(key=key, value=raw, timestamp=None)
                sent += 1
            for partition, batch in batches.items():
                pending.append(await producer.send_batch(batch, topic, partition=partition))
            pending = _undelivered(pending)
            await asyncio.sleep(TICK_S)
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return sent


def _undelivered(futures: list[asyncio.Future[Any]]) -> list[asyncio.Future[Any]]:
    """The futures still pending; a failed delivery raises."""
    for f in futures:
        if f.done():
            f.result()
    return [f for f in futures if not f.done()]


def p99_by_half(samples: list[tuple[float, float]], middle: float) -> tuple[float, float]:
    """p99 of ``(event time, latency)`` samples before and from ``middle``."""
    first = [lat for t, lat in samples if t < middle]
    second = [lat for t, lat in samples if t >= middle]
    return _p99(first), _p99(second)


async def profile_run(ctx: Context, rate: float, seconds: float) -> dict[str, Any]:
    """One extra run (not among the measured ones) with py-spy on the worker: where the worker
    spends its CPU at this rate (``latency-profile.collapsed.txt``)."""
    raw = ctx.work / "latency-profile.txt"
    raw.unlink(missing_ok=True)
    r = await one_run(ctx, rate, seconds, "profile", profile=raw)
    if not raw.exists():
        return {"available": False}
    summary = summarize_collapsed(raw.read_text())
    summary["while_profiled"] = (
        f"p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms at {r['rate']:,.0f} events/s"
    )
    shutil.copy(raw, ctx.out / "latency-profile.collapsed.txt")
    log(f"latency profile: {summary['samples']} samples; top self: {summary['self'][:5]}")
    return summary


def fetch_wait_ms(ctx: Context) -> int:
    """The worker's ``kafka.fetch_max_wait_ms`` on this stack (its default unless the broker's
    client settings change it)."""
    wait = ctx.stack.kafka_settings().get("fetch_max_wait_ms", KafkaSettings().fetch_max_wait_ms)
    return int(wait)


def _p99(values: list[float]) -> float:
    if len(values) < 2:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[98]


async def _warm_up(ctx: Context, topic: str, worker: LiveWorker) -> int:
    """One event per partition, stored: the group is joined and every partition assigned."""
    producer = AIOKafkaProducer(bootstrap_servers=ctx.stack.bootstrap, acks="all")
    await producer.start()
    try:
        for p in range(PARTITIONS):
            value = {"id": f"warm-{p}", "namespace": "bench", "text": f"warm up {p}"}
            await producer.send_and_wait(topic, json.dumps(value).encode(), partition=p)
    finally:
        await producer.stop()
    await worker.wait_for(4, 120)
    return 4


async def broker_alone(ctx: Context, rate: float, seconds: float, i: int) -> dict[str, float]:
    """p50, p99 (and the p99 of each half) in ms from an event's timestamp to its arrival in a
    bare aiokafka consumer with the worker's fetch wait (``kafka.fetch_max_wait_ms`` on this
    stack): what the broker alone adds."""
    from aiokafka import AIOKafkaConsumer

    topic = f"bench.latency.broker{i}"
    await ctx.stack.create_topics([topic], partitions=PARTITIONS)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=ctx.stack.bootstrap,
        group_id=topic,
        fetch_max_wait_ms=fetch_wait_ms(ctx),
        auto_offset_reset="earliest",
        session_timeout_ms=10_000,
        heartbeat_interval_ms=3_000,
    )
    await consumer.start()
    samples: list[tuple[float, float]] = []  # (event time s, latency ms)
    expected = int(rate * seconds)
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=100)

        async def consume() -> None:
            while len(samples) < expected:
                batches = await consumer.getmany(timeout_ms=200)
                now = time.time()
                for messages in batches.values():
                    for m in messages:
                        stamp = json.loads(m.value)["timestamp"]
                        samples.append((stamp / 1000, now * 1000 - stamp))

        task = asyncio.create_task(consume())
        started = time.time()
        sent = await _produce_steady(ctx.stack.bootstrap, topic, rate, seconds, f"brk{i}")
        expected = sent
        await asyncio.wait_for(task, 60)
    finally:
        await consumer.stop()
    q = statistics.quantiles([lat for _, lat in samples], n=100, method="inclusive")
    first, second = p99_by_half(samples, started + seconds / 2)
    return {"p50": q[49], "p99": q[98], "p99_first_half": first, "p99_second_half": second}


async def one_run(
    ctx: Context, rate: float, seconds: float, i: int | str, profile: Path | None = None
) -> dict[str, Any]:
    """One measured run; with ``profile``, py-spy samples the worker from the warm-up's end
    (its raw collapsed stacks are written there)."""
    topic = f"bench.latency.r{i}"
    await ctx.stack.create_topics([topic], partitions=PARTITIONS)
    port = free_port()
    worker = await LiveWorker.start(
        ctx,
        topic,
        f"lat_r{i}",
        DIMENSION,
        overrides={"http": {"enabled": "true", "host": "127.0.0.1", "port": port}},
    )
    polls: dict[int, list[tuple[float, int]]] = {p: [] for p in range(PARTITIONS)}
    stop_polling = asyncio.Event()

    async def poll(conn: asyncpg.Connection) -> None:
        while not stop_polling.is_set():
            offsets = await store.load_offsets(conn, worker.name, topic)
            now = time.time()
            for p, o in offsets.items():
                polls[p].append((now, o))
            await asyncio.sleep(POLL_S)

    spy = None
    try:
        warm = await _warm_up(ctx, topic, worker)
        if profile is not None:
            spy = await start_py_spy(worker.pid, profile)
        conn = await asyncpg.connect(worker.dsn)
        poller = asyncio.create_task(poll(conn))
        cpu = worker.cpu_window()
        cpu.start()
        try:
            started = time.time()
            sent = await _produce_steady(ctx.stack.bootstrap, topic, rate, seconds, f"lat{i}")
            await worker.wait_for(warm + sent, 120, every_s=0.05)
            usage = cpu.stop()
            await asyncio.sleep(3 * POLL_S)
        finally:
            stop_polling.set()
            await poller
        rows = await conn.fetch(
            "SELECT source_partition, source_offset, event_time FROM embeddings "
            "WHERE id NOT LIKE 'warm-%'"
        )
        await conn.close()
        stages = await worker_stages(port)
    finally:
        await worker.stop()
        if spy is not None:
            await asyncio.wait_for(spy.wait(), 60)
    samples = []  # (event time s, latency ms)
    for r in rows:
        seen = next(t for t, o in polls[r["source_partition"]] if o > r["source_offset"])
        event_time = r["event_time"].timestamp()
        samples.append((event_time, 1000 * (seen - event_time)))
    latencies = sorted(lat for _, lat in samples)
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    first, second = p99_by_half(samples, started + seconds / 2)
    return {
        "p50": q[49],
        "p99": q[98],
        "p99_first_half": first,
        "p99_second_half": second,
        "max": latencies[-1],
        "rows": len(rows),
        "rate": sent / seconds,
        **stages,
        "cpu": usage,
    }


async def run(ctx: Context) -> list[Figure]:
    s1 = ctx.shared.get("overhead_median")
    rate = 0.5 * s1 if isinstance(s1, float) and not ctx.sizes.smoke else ctx.sizes.latency_rate
    seconds = ctx.sizes.latency_seconds
    results = []
    runs = ctx.slow_runs
    for i in range(runs):
        r = await one_run(ctx, rate, seconds, i)
        r["broker"] = await broker_alone(ctx, rate, seconds, i)
        results.append(r)
        b = r["broker"]
        log(
            f"latency run {i + 1}/{runs}: {r['rate']:,.0f} events/s offered, p50 "
            f"{r['p50']:.0f} ms, p99 {r['p99']:.0f} ms (halves {r['p99_first_half']:.0f}, "
            f"{r['p99_second_half']:.0f}), max {r['max']:.0f} ms; provider p99 "
            f"{r['provider_p99_ms']:.1f} ms ({r['rows']} rows, {r['requests']:.0f} requests, "
            f"{r['writes']:.0f} transactions, write p50 {r['write_p50_ms']:.1f} p99 "
            f"{r['write_p99_ms']:.1f} ms); broker alone p50 "
            f"{b['p50']:.0f} ms, p99 {b['p99']:.0f} ms (halves {b['p99_first_half']:.0f}, "
            f"{b['p99_second_half']:.0f})"
        )
    profile: dict[str, Any] = {}
    if ctx.sizes.profile:
        profile = await profile_run(ctx, rate, seconds)
    provider = statistics.median(r["provider_p99_ms"] for r in results)
    target = LINGER_MS + 2 * provider
    wait = fetch_wait_ms(ctx)
    broker = ctx.stack.broker.label
    notes = (
        f"{rate:,.0f} events/s offered for {seconds:.0f} s per run ("
        + ("half of scenario 1's median" if s1 and not ctx.sizes.smoke else "fixed rate")
        + f"), instant fake, worker defaults (linger {LINGER_MS} ms; fetch wait "
        f"{wait} ms on {broker}); stored = offset visible in Postgres, polled every 10 ms"
    )
    cpu = median_cpu([r["cpu"] for r in results])
    return [
        Figure(
            SCENARIO,
            "end-to-end latency p50 (event timestamp -> stored)",
            "ms",
            [r["p50"] for r in results],
            cpu=cpu,
            notes=notes,
        ),
        Figure(
            SCENARIO,
            "end-to-end latency p99 (event timestamp -> stored)",
            "ms",
            [r["p99"] for r in results],
            limit=target,
            limit_label=(
                f"≤ {target:.0f} ms = linger {LINGER_MS} + 2 × provider p99 {provider:.1f}"
            ),
            higher_is_better=False,
            extra={
                "max_ms": [r["max"] for r in results],
                **({"profile": profile} if profile else {}),
            },
        ),
        Figure(
            SCENARIO,
            "end-to-end latency p99, first half of each run",
            "ms",
            [r["p99_first_half"] for r in results],
        ),
        Figure(
            SCENARIO,
            "end-to-end latency p99, second half of each run",
            "ms",
            [r["p99_second_half"] for r in results],
            notes=(
                "halves by event time; Tansu's in-memory engine lists every stored batch of a "
                "partition on each fetch, so its cost grows over a run (Apache Kafka's does not)"
            ),
        ),
        Figure(
            SCENARIO,
            "broker alone p99 (timestamp -> a bare consumer, same fetch settings)",
            "ms",
            [r["broker"]["p99"] for r in results],
            notes=(
                "the same rate, for as long, into a bare aiokafka consumer with the worker's "
                f"fetch_max_wait_ms ({wait} ms on {broker}; Tansu holds a fetch for that long "
                "when the partition is empty at the request, Apache Kafka answers when data "
                "arrives)"
            ),
            extra={
                "p50_ms": [r["broker"]["p50"] for r in results],
                "p99_first_half_ms": [r["broker"]["p99_first_half"] for r in results],
            },
        ),
        Figure(
            SCENARIO,
            "broker alone p99, second half of each run",
            "ms",
            [r["broker"]["p99_second_half"] for r in results],
        ),
        Figure(
            SCENARIO,
            "provider p99 as the worker saw it",
            "ms",
            [r["provider_p99_ms"] for r in results],
            notes="from embedding_worker_api_request_seconds (outcome ok), interpolated",
            extra={
                "requests": [r["requests"] for r in results],
                "rows": [r["rows"] for r in results],
            },
        ),
        Figure(
            SCENARIO,
            "Postgres write transaction p99 as the worker saw it",
            "ms",
            [r["write_p99_ms"] for r in results],
            notes="from embedding_worker_db_write_seconds (rows and offsets, one transaction)",
            extra={
                "p50_ms": [r["write_p50_ms"] for r in results],
                "transactions": [r["writes"] for r in results],
            },
        ),
    ]
