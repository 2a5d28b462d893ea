"""Scenario 1 at 100 ms: the worker-overhead setup behind a provider that answers in 100 ms.

A far region or a busy GPU server: the worker's CPU is no longer the bound, the requests it
keeps in flight are (Little's law: events/s = texts in flight / latency). Same topic, worker
defaults and fake as scenario 1 (which accepts 10 texts per request, as DashScope does), plus
``--latency-ms 100``; then the same with a fake that accepts 64 (a self-hosted server). A new
fake per run, so its counters (429s, 400s, most requests in flight) are the run's own.
"""

from __future__ import annotations

from typing import Any

from benchmarks.context import Context
from benchmarks.harness import FakeProvider, Figure, log, median_cpu
from benchmarks.overhead import one_run
from benchmarks.topic import shared_topic

SCENARIO = "1-latency100"
LATENCY_MS = 100.0
TARGET_EVENTS_PER_S = 4_000.0


async def run(ctx: Context) -> list[Figure]:
    figures = await _measure(ctx, (), "")
    # A self-hosted server (TEI, vLLM, Infinity) takes more than 10 texts per request.
    figures += await _measure(ctx, ("--max-texts", "64"), " (fake takes 64 texts)")
    return figures


async def _measure(ctx: Context, fake_args: tuple[str, ...], label: str) -> list[Figure]:
    topic, total = await shared_topic(ctx)
    rates: list[float] = []
    cpus: list[dict[str, float]] = []
    fakes: list[dict[str, Any]] = []
    for i in range(ctx.runs):
        fake = await FakeProvider("--latency-ms", str(LATENCY_MS), *fake_args).start()
        try:
            rate, usage = await one_run(ctx, topic, total, f"l{i}", fake=fake)
            stats = await fake.stats()
        finally:
            await fake.stop()
        rates.append(rate)
        cpus.append(usage)
        fakes.append(stats)
        cpu_text = ", ".join(f"{k} {v:.0f}%" for k, v in usage.items())
        log(
            f"latency100{label} run {i + 1}/{ctx.runs}: {rate:,.0f} events/s (CPU {cpu_text}); "
            f"requests {stats['requests']}, 429s {stats['throttled']}, "
            f"400s {stats['by_status'].get('400', 0)}, max in flight {stats['max_in_flight']}"
        )
    takes = fake_args[-1] if fake_args else "10"
    return [
        Figure(
            scenario=SCENARIO + label,
            name="worker end-to-end throughput (fake provider at 100 ms, no quota)",
            unit="events/s",
            runs=rates,
            limit=TARGET_EVENTS_PER_S,
            limit_label="target ≥ 4,000 events/s",
            cpu=median_cpu(cpus),
            notes=(
                f"{total:,} events, scenario 1's topic and worker defaults; the fake answers "
                f"after {LATENCY_MS:.0f} ms and accepts up to {takes} texts per request"
            ),
            extra={"events": total, "latency_ms": LATENCY_MS, "fake_max_texts": int(takes)},
        ),
        Figure(
            scenario=SCENARIO + label,
            name="requests in flight at the fake (most, per run)",
            unit="requests",
            runs=[float(s["max_in_flight"]) for s in fakes],
        ),
        Figure(
            scenario=SCENARIO + label,
            name="429 answers per run",
            unit="count",
            runs=[float(s["throttled"]) for s in fakes],
            limit=0.0,
            limit_label="must be 0 (the fake has no quota)",
            higher_is_better=False,
        ),
    ]
