"""Scenario 9, replicated: scenario 1 on a 3-broker Apache Kafka, as a ratio to one node.

The cluster is the dev stack's ``kafka-cluster`` (3 combined broker + controller JVMs,
replication factor 3, ``min.insync.replicas`` 2) with its own Postgres, started for this
scenario only. The reference is one Apache Kafka node: the run's own stack when it is one
(``--broker kafka``), else a second stack started beside it. Everything else is scenario 1:
the same events (produced beforehand, 4 partitions, by the harness with ``acks=all``), the
same instant fake, worker defaults (its producer, unused here, is ``acks=all`` too); on the
cluster every input partition, and ``__consumer_offsets``, has three replicas. Runs alternate
between the two stacks and the ratio is taken per pair. All the JVMs share this machine's
cores, so the figure says what replication costs here, not on three machines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from benchmarks import overhead
from benchmarks.context import Context
from benchmarks.harness import Figure, events, log, median_cpu, produce
from worker.tools.devstack import DevStack

SCENARIO = "9-replicated"
PARTITIONS = 4


@contextlib.asynccontextmanager
async def _stack(ctx: Context, broker: str) -> AsyncIterator[Context]:
    """A context on ``broker``: the run's own if it is that broker, else a new stack."""
    if ctx.stack.broker.name == broker:
        yield ctx
        return
    t0 = time.monotonic()
    async with DevStack(broker) as stack:
        log(f"replicated: {stack.broker.label} started in {time.monotonic() - t0:.1f} s")
        yield dataclasses.replace(ctx, stack=stack, shared={})


async def _topic(ctx: Context) -> tuple[str, int, float]:
    """Scenario 1's topic on this stack, produced here: (topic, events, produce events/s)."""
    topic = "bench.replicated"
    await ctx.stack.create_topics([topic, "bench.dlq"], partitions=PARTITIONS)
    n = ctx.sizes.overhead_events
    t0 = time.monotonic()
    await produce(ctx.stack, topic, events(n, prefix="repl"))
    rate = n / (time.monotonic() - t0)
    log(f"replicated: produced {n} events on {ctx.stack.broker.label} at {rate:,.0f}/s")
    return topic, n, rate


async def run(ctx: Context) -> list[Figure]:
    async with _stack(ctx, "kafka") as one, _stack(ctx, "kafka-cluster") as three:
        (t1, n1, p1), (t3, n3, p3) = await _topic(one), await _topic(three)
        single: list[float] = []
        cluster: list[float] = []
        cpus: dict[str, list[dict[str, float]]] = {"one": [], "three": []}
        for i in range(ctx.slow_runs):
            rate1, cpu1 = await overhead.one_run(one, t1, n1, f"one{i}")
            rate3, cpu3 = await overhead.one_run(three, t3, n3, f"three{i}")
            single.append(rate1)
            cluster.append(rate3)
            cpus["one"].append(cpu1)
            cpus["three"].append(cpu3)
            log(
                f"replicated run {i + 1}/{ctx.slow_runs}: one node {rate1:,.0f}, three nodes "
                f"{rate3:,.0f} events/s ({rate3 / rate1:.2f})"
            )
    setup = (
        f"scenario 1 ({n1:,} events, 4 partitions, instant fake, worker defaults); the "
        "cluster: 3 KRaft nodes on this machine, replication factor 3, min.insync.replicas 2, "
        "events produced with acks=all; runs alternate between the two stacks"
    )
    extra: dict[str, Any] = {"produce_events_per_s": {"one node": p1, "three nodes": p3}}
    return [
        Figure(
            SCENARIO,
            "worker throughput, one Apache Kafka node",
            "events/s",
            single,
            limit=overhead.TARGET_EVENTS_PER_S,
            limit_label="scenario 1's target ≥ 5,000 events/s",
            cpu=median_cpu(cpus["one"]),
            notes=setup,
        ),
        Figure(
            SCENARIO,
            "worker throughput, 3-broker cluster (replication 3, acks=all)",
            "events/s",
            cluster,
            limit=overhead.TARGET_EVENTS_PER_S,
            limit_label="scenario 1's target ≥ 5,000 events/s",
            cpu=median_cpu(cpus["three"]),
            extra=extra,
        ),
        Figure(
            SCENARIO,
            "3-broker cluster ÷ one node",
            "ratio",
            [c / s for s, c in zip(single, cluster, strict=True)],
            notes=(
                "per interleaved pair of runs; the harness produced the events at "
                f"{p1:,.0f}/s to one node and {p3:,.0f}/s to the cluster (acks=all, once each)"
            ),
        ),
    ]
