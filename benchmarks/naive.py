"""Scenario 2: the naive peer (``benchmarks/naive_peer.py``) on the same topic and fake.

Measured like scenario 1, from the first row stored to the ``naive_events``-th, by polling the
row count; the figure reported is ours ÷ naive (scenario 1's median over this one's runs).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time

import asyncpg

from benchmarks.context import Context
from benchmarks.harness import (
    CpuWindow,
    Figure,
    Subprocess,
    drop_database,
    fresh_database,
    log,
    median_cpu,
    stack_roots,
    unique,
)
from benchmarks.overhead import DIMENSION
from benchmarks.topic import shared_topic

SCENARIO = "2-naive-peer"
TARGET_SPEEDUP = 30.0


async def one_run(
    ctx: Context, topic: str, limit: int, label: str
) -> tuple[float, dict[str, float]]:
    name = unique(f"bench_naive_{label}")
    dsn = await fresh_database(ctx.stack, name, DIMENSION)
    args = [
        "-m",
        "benchmarks.naive_peer",
        "--bootstrap",
        ctx.stack.bootstrap,
        "--topic",
        topic,
        "--group",
        name,
        "--dsn",
        dsn,
        "--url",
        ctx.fake.openai_url,
        "--limit",
        str(limit),
    ]
    proc = await Subprocess(args, {}, ctx.work / f"{name}.log").start()
    roots = {"naive-peer": proc.pid, "fake-provider": ctx.fake.pid, **stack_roots(ctx.stack)}
    roots["harness"] = os.getpid()
    cpu = CpuWindow(roots)
    conn = await asyncpg.connect(dsn)
    try:
        first_t: float | None = None
        first_n = 0
        deadline = time.monotonic() + 600
        while True:
            n = int(await conn.fetchval("SELECT count(*) FROM embeddings"))
            now = time.monotonic()
            if first_t is None and n > 0:
                first_t, first_n = now, n
                cpu.start()
            if n >= limit:
                usage = cpu.stop()
                assert first_t is not None
                rate = (n - first_n) / (now - first_t)
                break
            if proc.exited() or now > deadline:
                raise RuntimeError(f"the naive peer stopped at {n}/{limit}; see {proc.log_path}")
            await asyncio.sleep(0.02)
    finally:
        await conn.close()
        await proc.terminate()
        await drop_database(ctx.stack, name)
    return rate, usage


async def run(ctx: Context, ours: list[float] | None = None) -> list[Figure]:
    topic, total = await shared_topic(ctx)
    limit = min(ctx.sizes.naive_events, total)
    rates: list[float] = []
    cpus: list[dict[str, float]] = []
    for i in range(ctx.runs):
        rate, usage = await one_run(ctx, topic, limit, f"r{i}")
        rates.append(rate)
        cpus.append(usage)
        cpu_text = ", ".join(f"{k} {v:.0f}%" for k, v in usage.items())
        log(f"naive run {i + 1}/{ctx.runs}: {rate:,.0f} events/s (CPU {cpu_text})")
    figures = [
        Figure(
            scenario=SCENARIO,
            name="naive peer throughput (1 call, 1 INSERT, 1 commit per event)",
            unit="events/s",
            runs=rates,
            cpu=median_cpu(cpus),
            notes=f"first {limit:,} events of the same topic; float JSON vectors",
        )
    ]
    if ours:
        ratios = [statistics.median(ours) / r for r in rates]
        figures.append(
            Figure(
                scenario=SCENARIO,
                name="speed-up: worker ÷ naive peer",
                unit="×",
                runs=ratios,
                limit=TARGET_SPEEDUP,
                limit_label="target ≥ 30×",
                notes="scenario 1's median ÷ each naive run (min–max spans the naive runs)",
            )
        )
    return figures
