"""How long to wait before the next attempt: one formula for every retry loop.

Capped exponential (``initial * 2**attempt``, at most ``cap``) where the worker alone waits
for a service to come back (Postgres, Kafka, the schema registry); with full jitter where
many requests retry against one shared provider, so they do not return in step.
"""

from __future__ import annotations

import random

# 2**62 times any initial delay passes any cap; a bounded exponent never overflows a float,
# however long the outage.
_MAX_EXPONENT = 62


def capped(attempt: int, initial: float, cap: float) -> float:
    """``initial`` doubled per attempt (counted from 0), at most ``cap``."""
    return min(cap, initial * 2.0 ** min(attempt, _MAX_EXPONENT))


def jittered(attempt: int, initial: float, cap: float, retry_after: float | None) -> float:
    """Full jitter (AWS style): uniform up to ``capped``, but never sooner than the provider
    asked for (its Retry-After)."""
    delay = random.uniform(0, capped(attempt, initial, cap))
    return delay if retry_after is None else max(delay, retry_after)
