"""Scenario 3, provider saturation: a quota-limited fake with realistic latency.

The fake (its own process) allows 100 requests/s (RPM 6,000) and a tokens-per-minute quota,
both enforced per second with one second of burst, answers after 80-120 ms (100 ms on
average, uniform jitter), and answers 429 with ``Retry-After`` beyond either quota. The
TPM quota is set so that it binds (80 % of what 100 requests/s of 10 texts would bill for
these texts), so the capacity is ``min(RPM/60 x 10, TPM/60 / tokens per text)`` texts/s,
with the tokens counted by the fake's own tokenizer over the events produced.

The worker is configured as an operator who knows the quota would: ``provider.rpm`` and
``provider.tpm`` set to the quota, everything else at its defaults (the adaptive
concurrency's ceiling then follows from the quota and the observed latency). A second
configuration does not tell it the quota: the fake's 429s with ``Retry-After`` and the
adaptive concurrency must find it. Each run gets a new fake (full buckets, zeroed counters),
a new database and consumer group. The rate is
measured between the samples where 20 % and 95 % of the events were stored (the first
second's burst and the tail excluded). Lost events: produced - rows stored (every event
has its own id; a dead letter has no row).
"""

from __future__ import annotations

import json
import statistics

from benchmarks.context import Context
from benchmarks.harness import FakeProvider, Figure, events, log, median_cpu, produce
from benchmarks.live import LiveWorker
from fakeapi.tokens import count_tokens

SCENARIO = "3-provider-saturation"
TARGET_RATIO = 0.95
DIMENSION = 1024
RPM = 6_000
TEXTS_PER_REQUEST = 10
LATENCY_MS, JITTER_MS = 80.0, 40.0


async def run(ctx: Context) -> list[Figure]:
    n = ctx.sizes.saturation_events
    topic = "bench.saturation"
    await ctx.stack.create_topics([topic], partitions=4)
    records = list(events(n, prefix="sat"))
    await produce(ctx.stack, topic, records)
    tokens = sum(count_tokens(json.loads(v)["text"]) for _, v in records) / n
    # TPM binds: 80 % of what RPM x 10 texts would bill.
    tpm = int(0.8 * RPM * TEXTS_PER_REQUEST * tokens)
    capacity = min(RPM / 60 * TEXTS_PER_REQUEST, tpm / 60 / tokens)
    log(f"saturation: {n} events, {tokens:.1f} tokens/text, TPM {tpm:,}, {capacity:,.0f} texts/s")
    told = {"rpm": RPM, "tpm": tpm}
    figures = await _measure(ctx, topic, n, tpm, capacity, tokens, told, ctx.slow_runs, "")
    # The same quota, but the worker is not told: 429 + Retry-After and AIMD must find it.
    untold: dict[str, int] = {}
    runs = min(ctx.slow_runs, 3)
    figures += await _measure(ctx, topic, n, tpm, capacity, tokens, untold, runs, " (not told)")
    return figures


async def _measure(
    ctx: Context,
    topic: str,
    n: int,
    tpm: int,
    capacity: float,
    tokens: float,
    provider: dict[str, int],
    runs: int,
    label: str,
) -> list[Figure]:
    rates, ratios, throttled, lost, cpus = [], [], [], [], []
    requests = []
    for i in range(runs):
        fake = await FakeProvider(
            "--rpm",
            str(RPM),
            "--tpm",
            str(tpm),
            "--latency-ms",
            str(LATENCY_MS),
            "--latency-jitter-ms",
            str(JITTER_MS),
            "--seed",
            str(i),
        ).start()
        worker = None
        try:
            worker = await LiveWorker.start(
                ctx, topic, f"sat_r{i}", DIMENSION, fake, {"provider": dict(provider)}
            )
            await worker.wait_for(1, 120)
            cpu = worker.cpu_window()
            cpu.start()
            await worker.wait_for(n, 600)
            cpus.append(cpu.stop())
            rate = worker.rate_between(int(0.2 * n), int(0.95 * n))
            window = worker.crossing(int(0.95 * n)) - worker.crossing(int(0.2 * n))
            rows = await worker.rows()
            stats = await fake.stats()
        finally:
            if worker is not None:
                await worker.stop()
            await fake.stop()
        rates.append(rate)
        ratios.append(rate / capacity)
        throttled.append(float(stats["throttled"]))
        lost.append(float(n - rows))
        requests.append(stats["requests"])
        log(
            f"saturation{label} run {i + 1}/{runs}: {rate:,.0f} texts/s = {rate / capacity:.3f} "
            f"of capacity over {window:.1f} s; 429s {stats['throttled']}, lost {n - rows}, "
            f"requests {stats['requests']}, max in flight {stats['max_in_flight']}"
        )
    worker_side = (
        "provider.rpm/tpm = the quota"
        if "tpm" in provider
        else "provider.rpm/tpm unset (429s, Retry-After and AIMD only)"
    )
    setup = (
        f"{n:,} events ({tokens:.1f} tokens/text by the fake's count); fake: {RPM // 60} "
        f"requests/s, TPM {tpm:,}, {LATENCY_MS:.0f}-{LATENCY_MS + JITTER_MS:.0f} ms, 429 + "
        f"Retry-After beyond; worker: {worker_side}, other settings at their defaults "
        "(the fake takes 10 texts/request)"
    )
    return [
        Figure(
            SCENARIO + label,
            "achieved texts/s against the quota",
            "texts/s",
            rates,
            limit=capacity,
            limit_label=f"quota capacity {capacity:,.0f} texts/s (TPM-bound)",
            judged=False,  # the target is the ratio below
            cpu=median_cpu(cpus),
            notes=setup + "; rate between 20 % and 95 % of the events stored",
            extra={"tpm": tpm, "rpm": RPM, "tokens_per_text": round(tokens, 2)},
        ),
        Figure(
            SCENARIO + label,
            "achieved ÷ quota capacity",
            "ratio",
            ratios,
            limit=TARGET_RATIO,
            limit_label="target ≥ 0.95",
        ),
        Figure(
            SCENARIO + label,
            "429 answers per run",
            "count",
            throttled,
            notes=f"requests per run (median): {statistics.median(requests):,.0f}",
        ),
        Figure(
            SCENARIO + label,
            "events lost (produced - rows stored)",
            "count",
            lost,
            limit=0.0,
            limit_label="must be 0",
            higher_is_better=False,
        ),
    ]
