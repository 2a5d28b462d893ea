"""Scenario 1, worker overhead: Kafka -> batcher -> instant fake provider -> Postgres -> offsets.

The events are produced beforehand; each run starts the real worker (``python -m worker
run``) with a fresh database (1024-d, no vector index) and a fresh consumer group, and measures
from the first offset stored in Postgres to the last: ``(events - already stored at the first
observation) / elapsed``. The provider is ``python -m fakeapi`` (OpenAI dialect, base64,
no latency) in its own process, so the CPU of each process can be told apart.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks.context import Context
from benchmarks.harness import (
    CpuWindow,
    FakeProvider,
    Figure,
    Subprocess,
    drop_database,
    fresh_database,
    log,
    median_cpu,
    stack_roots,
    unique,
)
from benchmarks.otlp_sink import OtlpSink
from benchmarks.topic import shared_topic
from worker.config import AUTO_MAX_CONCURRENCY, INITIAL_CONCURRENCY, BatchSettings, environment_for
from worker.embedding.providers.openai import MAX_TEXTS
from worker.sinks import postgres as store

# The worker defaults the notes describe.
BATCH = BatchSettings()

SCENARIO = "1-worker-overhead"
TARGET_EVENTS_PER_S = 5_000.0
DIMENSION = 1024
POLL_S = 0.02


def worker_config(
    ctx: Context,
    topic: str,
    dsn: str,
    group: str,
    fake: FakeProvider | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The worker's defaults, except what points it at the bench stack (with the embedded
    broker's workarounds, ``DevStack.kafka_settings``) and the fake.

    ``overrides`` merges settings into sections, e.g. ``{"batch": {"max_in_flight": 8000}}``.
    """
    config: dict[str, Any] = {
        "kafka": {
            **ctx.stack.kafka_settings(),
            "group_id": group,
            "input_topic": topic,
            "dlq_topic": "bench.dlq",
        },
        "postgres": {"dsn": dsn},
        "provider": {
            "kind": "openai",
            "base_url": (fake or ctx.fake).openai_url,
            "api_key": "bench-key",
            "dimension": DIMENSION,
            "encoding_format": "base64",
        },
        "http": {"enabled": "false"},
        "log_format": "json",
    }
    for section, values in (overrides or {}).items():
        config.setdefault(section, {}).update(values)
    return config


async def _wait_stored(
    dsn: str,
    group: str,
    topic: str,
    total: int,
    cpu: CpuWindow,
    proc: Subprocess,
    timeout_s: float,
    on_first: Callable[[], Awaitable[None]] | None = None,
) -> tuple[float, int, dict[str, float]]:
    """Poll Postgres' offsets; returns (seconds from first to last, events in that span, cpu)."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout_s
        first_t: float | None = None
        first_n = 0
        while True:
            stored = sum((await store.load_offsets(conn, group, topic)).values())
            now = time.monotonic()
            if first_t is None and stored > 0:
                if on_first is not None:
                    await on_first()  # the profiler attaches in the steady state
                    now = time.monotonic()
                    stored = sum((await store.load_offsets(conn, group, topic)).values())
                first_t, first_n = now, stored
                cpu.start()
            if stored >= total:
                usage = cpu.stop()
                assert first_t is not None
                return now - first_t, total - first_n, usage
            if proc.exited():
                raise RuntimeError(f"the worker exited early; see {proc.log_path}")
            if now > deadline:
                raise RuntimeError(f"only {stored}/{total} events stored in {timeout_s} s")
            await asyncio.sleep(POLL_S)
    finally:
        await conn.close()


async def one_run(
    ctx: Context,
    topic: str,
    total: int,
    label: str,
    profile: Path | None = None,
    fake: FakeProvider | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> tuple[float, dict[str, float]]:
    name = unique(f"bench_overhead_{label}")
    dsn = await fresh_database(ctx.stack, name, DIMENSION)
    fake = fake or ctx.fake
    env = environment_for(worker_config(ctx, topic, dsn, name, fake, overrides))
    proc = await Subprocess(["-m", "worker", "run"], env, ctx.work / f"{name}.log").start()
    spy: asyncio.subprocess.Process | None = None

    async def attach() -> None:
        nonlocal spy
        if profile is not None:
            spy = await start_py_spy(proc.pid, profile)

    try:
        roots = {"worker": proc.pid, "fake-provider": fake.pid, **stack_roots(ctx.stack)}
        roots["harness"] = os.getpid()
        seconds, n, usage = await _wait_stored(
            dsn, name, topic, total, CpuWindow(roots), proc, 600, attach if profile else None
        )
    finally:
        await proc.terminate()
        if spy is not None:
            await asyncio.wait_for(spy.wait(), 60)
        await drop_database(ctx.stack, name)
    return n / seconds, usage


async def run(ctx: Context) -> list[Figure]:
    topic, total = await shared_topic(ctx)
    rates: list[float] = []
    cpus: list[dict[str, float]] = []
    for i in range(ctx.runs):
        rate, usage = await one_run(ctx, topic, total, f"r{i}")
        rates.append(rate)
        cpus.append(usage)
        cpu_text = ", ".join(f"{k} {v:.0f}%" for k, v in usage.items())
        log(f"overhead run {i + 1}/{ctx.runs}: {rate:,.0f} events/s (CPU {cpu_text})")
    extra: dict[str, Any] = {"events": total, "dimension": DIMENSION}
    if ctx.sizes.profile:
        extra["profile"] = await profile_run(ctx, topic, total)
    figures = [
        Figure(
            scenario=SCENARIO,
            name="worker end-to-end throughput (fake provider, no index)",
            unit="events/s",
            runs=rates,
            limit=TARGET_EVENTS_PER_S,
            limit_label="target ≥ 5,000 events/s",
            cpu=median_cpu(cpus),
            notes=(
                f"{total:,} events produced beforehand, 4 partitions, 1024-d base64, worker "
                f"defaults ({MAX_TEXTS} texts/request, lowered to the fake's 10 at its first "
                f"refusals; adaptive concurrency from {INITIAL_CONCURRENCY} requests in flight, "
                f"ceiling {AUTO_MAX_CONCURRENCY}; ≤ {BATCH.max_in_flight:,} events in flight; "
                f"{BATCH.writers} writers, ≤ {BATCH.write_max_rows} rows/transaction)"
            ),
            extra=extra,
        )
    ]
    figures.append(
        Figure(
            scenario=SCENARIO,
            name="worker CPU time per event",
            unit="µs/event",
            runs=[1e6 * u.get("worker", 0.0) / 100 / r for u, r in zip(cpus, rates, strict=True)],
            higher_is_better=False,
            notes=(
                "the worker process tree's CPU seconds ÷ events stored, per run: less "
                "sensitive to the other load on the machine than events/s"
            ),
        )
    )
    if ctx.what_if:
        figures += await what_if(ctx, topic, total)
    if ctx.tracing is not None:
        figures += await tracing(ctx, topic, total, ctx.tracing)
    return figures


async def tracing(ctx: Context, topic: str, total: int, ratio: float) -> list[Figure]:
    """Tracing off and on in turn (so both see the same machine load), on with
    ``tracing.sample_ratio=ratio``: the events carry no ``traceparent``, so each event's span
    starts a trace of its own, sampled at that ratio."""
    runs: dict[str, list[tuple[float, dict[str, float]]]] = {"off": [], "on": []}
    with OtlpSink() as sink:
        on = {"tracing": {"enabled": True, "endpoint": sink.url, "sample_ratio": ratio}}
        for i in range(ctx.runs):
            for label, overrides in (("off", None), ("on", on)):
                rate, usage = await one_run(
                    ctx, topic, total, f"t{label}{i}", None, None, overrides
                )
                runs[label].append((rate, usage))
                log(
                    f"tracing {label} run {i + 1}: {rate:,.0f} events/s, worker CPU "
                    f"{1e6 * usage.get('worker', 0.0) / 100 / rate:.0f} µs/event"
                )
        payloads = sink.payloads
    figures = []
    for label, measured in runs.items():
        name = f"on (sample_ratio {ratio:g})" if label == "on" else label
        rates = [r for r, _ in measured]
        figures += [
            Figure(
                scenario=SCENARIO + " (tracing)",
                name=f"worker throughput, tracing {name}",
                unit="events/s",
                runs=rates,
                cpu=median_cpu([u for _, u in measured]),
                notes="runs off and on alternate; on: the sampled spans exported over OTLP/HTTP "
                f"to a loopback endpoint that discards them ({payloads} payloads in all)",
            ),
            Figure(
                scenario=SCENARIO + " (tracing)",
                name=f"worker CPU time per event, tracing {name}",
                unit="µs/event",
                runs=[1e6 * u.get("worker", 0.0) / 100 / r for r, u in measured],
                higher_is_better=False,
            ),
        ]
    return figures


# Settings-only variants (no code change) that test what the profile suggests; ``--variant
# 'label={"batch": {...}}'`` on the command line replaces them.
WHAT_IF: dict[str, dict[str, dict[str, Any]]] = {
    "provider.max_texts_per_request=64": {"provider": {"max_texts_per_request": 64}},
    "provider.max_concurrency=4 (the default before 16)": {"provider": {"max_concurrency": 4}},
    "provider.max_texts_per_request=64, max_concurrency=8": {
        "provider": {"max_texts_per_request": 64, "max_concurrency": 8},
    },
}


async def what_if(ctx: Context, topic: str, total: int) -> list[Figure]:
    """Scenario 1 again with provider settings changed (a fake that accepts 64 texts)."""
    fake = await FakeProvider("--max-texts", "64").start()
    figures = []
    try:
        for label, overrides in (ctx.variants or WHAT_IF).items():
            rates, cpus = [], []
            for i in range(min(ctx.runs, 3)):  # three runs each: the variants only point
                rate, usage = await one_run(ctx, topic, total, f"w{i}", None, fake, overrides)
                rates.append(rate)
                cpus.append(usage)
                cpu_text = ", ".join(f"{k} {v:.0f}%" for k, v in usage.items())
                log(f"what-if {label} run {i + 1}: {rate:,.0f} events/s (CPU {cpu_text})")
            figures.append(
                Figure(
                    scenario=SCENARIO + " (what-if)",
                    name=f"worker throughput with {label}",
                    unit="events/s",
                    runs=rates,
                    limit=TARGET_EVENTS_PER_S,
                    limit_label="target ≥ 5,000 events/s",
                    cpu=median_cpu(cpus),
                    notes="settings change only; the fake accepts up to 64 texts per request",
                )
            )
    finally:
        await fake.stop()
    return figures


# --------------------------------------------------------------------------- profile


async def start_py_spy(pid: int, out: Path) -> asyncio.subprocess.Process | None:
    # The [bench] extra installs it beside this Python, which need not be on PATH.
    exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if exe is None:
        log("py-spy not installed: no profile (pip install 'embedding-worker[bench]')")
        return None
    proc = await asyncio.create_subprocess_exec(
        exe,
        "record",
        "--pid",
        str(pid),
        "--rate",
        "200",
        "--format",
        "raw",
        "--output",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.sleep(0.5)
    return proc


async def profile_run(ctx: Context, topic: str, total: int) -> dict[str, Any]:
    """One extra run (not among the measured ones) with py-spy attached to the worker."""
    raw = ctx.work / "overhead-profile.txt"
    raw.unlink(missing_ok=True)
    rate, _ = await one_run(ctx, topic, total, "profile", profile=raw)
    if not raw.exists():
        return {"available": False}
    summary = summarize_collapsed(raw.read_text())
    summary["while_profiled"] = f"{rate:,.0f} events/s"
    shutil.copy(raw, ctx.out / "overhead-profile.collapsed.txt")
    log(f"profile: {summary['samples']} samples; top self: {summary['self'][:5]}")
    return summary


def _frame_name(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func (module.py)``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    short = "/".join(path.split("/")[-2:]) if "site-packages" in path else path.split("/")[-1]
    if path.startswith(
        ("worker/", "asyncio/", "aiokafka/", "asyncpg/", "aiohttp/", "httpx/", "httpcore/")
    ):
        short = path
    return f"{name} ({short})"


def _area(frames: list[str]) -> str:
    """Which part of the stack a sample was in, by its innermost recognised module."""
    areas = [
        ("asyncpg", "asyncpg (Postgres client)"),
        ("aiokafka", "aiokafka (Kafka client)"),
        ("kafka/", "aiokafka (Kafka client)"),
        ("aiohttp", "aiohttp (HTTP client)"),
        ("yarl", "aiohttp (HTTP client)"),
        ("multidict", "aiohttp (HTTP client)"),
        ("httpx", "httpx/httpcore (HTTP client)"),
        ("httpcore", "httpx/httpcore (HTTP client)"),
        ("h11", "httpx/httpcore (HTTP client)"),
        ("pgvector", "pgvector codec"),
        ("structlog", "logging"),
        ("logging/", "logging"),  # the stdlib handler structlog renders through
        ("prometheus_client", "metrics"),
        ("pydantic", "pydantic (event validation)"),
        ("json/", "json"),
        ("asyncio/", "asyncio event loop"),
        ("selectors", "asyncio event loop"),
    ]
    for frame in reversed(frames):
        for needle, area in areas:
            if needle in frame:
                return area
        if "(worker/" in frame:
            return "worker code (own frames)"
    return "other"


def summarize_collapsed(text: str, top: int = 15) -> dict[str, Any]:
    """Self and inclusive time per function from py-spy's collapsed stacks."""
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        names = [_frame_name(f) for f in frames]
        self_t[names[-1]] += count
        for n in set(names):
            incl[n] += count
        areas[_area(frames)] += count

    def pct(c: Counter[str]) -> list[list[Any]]:
        return [[k, round(100.0 * v / total, 1)] for k, v in c.most_common(top)] if total else []

    worker_incl = Counter({k: v for k, v in incl.items() if "(worker/" in k})
    return {
        "available": True,
        "samples": total,
        "self": pct(self_t),
        "inclusive_worker_functions": pct(worker_incl),
        "areas": pct(areas),
    }
