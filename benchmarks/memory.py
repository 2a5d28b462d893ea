"""Scenario 6, memory: the worker's resident set over a large backlog and a slow provider.

A backlog of ``memory_events`` (1,000,000 in the full run) upserts sits in the topic before
the worker starts; the fake answers after 300-400 ms, so the worker (defaults: 10 texts per
request, 16 in flight, ``max_in_flight`` 2,000) stores ~450 events/s and the backlog stays
for the whole window. RSS of the worker process is sampled every 0.25 s from the first
stored offset for ``memory_window_s`` seconds. Flat means: the highest sample of the last
third exceeds the highest of the middle third by at most ``GROWTH_LIMIT_MB``.
"""

from __future__ import annotations

import asyncio
import time

from benchmarks.context import Context
from benchmarks.harness import FakeProvider, Figure, events, log, median_cpu, produce
from benchmarks.live import LiveWorker, rss_mb

SCENARIO = "6-memory"
DIMENSION = 1024
RSS_LIMIT_MB = 300.0
GROWTH_LIMIT_MB = 15.0
SAMPLE_EVERY_S = 0.25
LATENCY_MS, JITTER_MS = 300.0, 100.0


async def run(ctx: Context) -> list[Figure]:
    n = ctx.sizes.memory_events
    window = ctx.sizes.memory_window_s
    runs = min(ctx.slow_runs, 3)
    topic = "bench.backlog"
    await ctx.stack.create_topics([topic], partitions=4)
    t0 = time.monotonic()
    await produce(ctx.stack, topic, events(n, prefix="backlog"))
    log(f"memory: produced a backlog of {n:,} events in {time.monotonic() - t0:.1f} s")
    fake = await FakeProvider(
        "--latency-ms", str(LATENCY_MS), "--latency-jitter-ms", str(JITTER_MS)
    ).start()
    peaks, growths, medians, left, cpus = [], [], [], [], []
    try:
        for i in range(runs):
            worker = await LiveWorker.start(ctx, topic, f"mem_r{i}", DIMENSION, fake)
            try:
                await worker.wait_for(1, 120)
                cpu = worker.cpu_window()
                cpu.start()
                samples: list[float] = []
                end = time.monotonic() + window
                while time.monotonic() < end:
                    samples.append(rss_mb(worker.pid))
                    await asyncio.sleep(SAMPLE_EVERY_S)
                cpus.append(cpu.stop())
                stored = await worker.poll()
            finally:
                await worker.stop(kill=True)  # a graceful stop would drain 2,000 slow events
            third = len(samples) // 3
            middle, last = max(samples[third : 2 * third]), max(samples[2 * third :])
            peaks.append(max(samples))
            growths.append(last - middle)
            medians.append(sorted(samples)[len(samples) // 2])
            left.append(float(n - stored))
            log(
                f"memory run {i + 1}/{runs}: RSS peak {max(samples):.1f} MB, middle third "
                f"{middle:.1f}, last third {last:.1f}; {stored:,} stored, {n - stored:,} left"
            )
    finally:
        await fake.stop()
    notes = (
        f"backlog of {n:,} events produced beforehand; fake {LATENCY_MS:.0f}-"
        f"{LATENCY_MS + JITTER_MS:.0f} ms per request; worker defaults (max_in_flight 2,000); "
        f"RSS every {SAMPLE_EVERY_S} s for {window:.0f} s from the first stored offset; "
        f"{runs} runs"
    )
    return [
        Figure(
            SCENARIO,
            "worker RSS, peak over the window",
            "MB",
            peaks,
            limit=RSS_LIMIT_MB,
            limit_label="≤ 300 MB",
            higher_is_better=False,
            cpu=median_cpu(cpus),
            notes=notes,
            extra={"median_rss_mb": medians, "backlog_left": left},
        ),
        Figure(
            SCENARIO,
            "RSS growth: peak of the last third - peak of the middle third",
            "MB",
            growths,
            limit=GROWTH_LIMIT_MB,
            limit_label=f"flat: ≤ {GROWTH_LIMIT_MB:.0f} MB",
            higher_is_better=False,
        ),
        Figure(
            SCENARIO,
            "backlog left in the topic at the end of the window",
            "events",
            left,
            notes="proves the backlog was there all along (the worker was never idle)",
        ),
    ]
