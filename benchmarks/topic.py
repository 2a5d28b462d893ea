"""The input topic shared by scenarios 1 and 2: produced once, read by one group per run."""

from __future__ import annotations

import time

from benchmarks.context import Context
from benchmarks.harness import events, log, produce

PARTITIONS = 4


async def shared_topic(ctx: Context) -> tuple[str, int]:
    """(topic, events) with at least ``overhead_events`` upserts, produced beforehand."""
    cached = ctx.shared.get("topic")
    if isinstance(cached, tuple):
        return cached[0], cached[1]
    topic = "bench.events"
    await ctx.stack.create_topics([topic], partitions=PARTITIONS)
    await ctx.stack.create_topics(["bench.dlq"], partitions=1)
    n = ctx.sizes.overhead_events
    t0 = time.monotonic()
    await produce(ctx.stack, topic, events(n))
    log(f"produced {n} events to {topic} in {time.monotonic() - t0:.1f} s")
    ctx.shared["topic"] = (topic, n)
    return topic, n
