"""Adaptive concurrency (AIMD): find how many requests the provider takes in parallel.

Requests in flight are what a latency-bound worker's throughput is made of (Little's law:
requests/s = in flight / latency), and no fixed number suits both a provider 20 ms away and
one 200 ms away. As TCP does with its window, the limit starts at a guess, grows by one per
round of successes (one success per slot) and halves on a throttle or a timeout. It grows only
while it is in use (the gate was full during the round): a limit that idle demand never
reached proves nothing about the provider, and would let a later burst through all at once.

Below :data:`SLOW_START_LIMIT` and until the first throttle, it grows by one per success
instead (slow start: it doubles per round trip), so a far provider is filled in a few round
trips: from 16, the ~40 requests a 100-ms provider needs for 4,000 texts/s in flight took ~3 s
of additive growth. Unbounded, the doubling ran to ~200 requests (~200 connections) under a
backlog, and the worker's resident memory rose from ~146 to 168-181 MB, past the bound of
tests/integration/test_backlog.py; past the cap, growth is additive again.

A burst of 429s from one wave of requests halves it once: throttles are ignored for a round
trip after a decrease (the moving average of successful requests' latency, at most
``window_s``) and for requests sent before it (they were answered for the old limit). A
longer window let a provider's instant 429s recycle the slots above its capacity for a whole
second (benchmark scenario 3 without the quota configured).

The limit never passes a ceiling: the configured maximum, or, when the quota is known, the
requests that quota can keep busy at the observed latency (:func:`quota_ceiling`); more would
only wait in the rate limiter holding a slot.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque

import structlog

from worker.embedding.ratelimit import Clock

log = structlog.get_logger(__name__)

# The limit doubles per round trip up to here (until the first throttle), then grows by one.
SLOW_START_LIMIT = 64
# Slots the quota ceiling keeps beyond rate x latency: latency varies, and requests leave the
# limiter in bursts of its one second of capacity.
QUOTA_HEADROOM = 2.0


def quota_ceiling(
    rpm: int | None, tpm: int | None, tokens_per_request: float, latency_s: float
) -> int | None:
    """Requests in flight that a per-minute quota can keep busy (None: no quota).

    ``rate x latency`` (Little's law) with :data:`QUOTA_HEADROOM`, from the tighter of the
    request and token quotas (the latter per request of ``tokens_per_request``); at least 1.
    """
    rates = []
    if rpm is not None:
        rates.append(rpm / 60.0)
    if tpm is not None and tokens_per_request > 0:
        rates.append(tpm / 60.0 / tokens_per_request)
    if not rates:
        return None
    return max(1, math.ceil(min(rates) * latency_s * QUOTA_HEADROOM))


class AdaptiveConcurrency:
    """A FIFO gate for in-flight requests whose size moves within ``[minimum, ceiling]``."""

    def __init__(
        self,
        minimum: int,
        maximum: int,
        *,
        initial: int | None = None,
        window_s: float = 1.0,
        slow_start_limit: int = SLOW_START_LIMIT,
        clock: Clock = time.monotonic,
    ) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError(f"need 1 <= minimum ({minimum}) <= maximum ({maximum})")
        self.minimum = minimum
        self.maximum = maximum
        self.window_s = window_s
        self._clock = clock
        self._ceiling = maximum
        self._limit = maximum if initial is None else min(max(initial, minimum), maximum)
        self._in_flight = 0
        self._successes = 0
        self._full = False  # the gate was full since the limit last moved
        self._slow_start_limit = slow_start_limit  # 0: no slow start after a throttle
        self._round_trip_s: float | None = None  # moving average of successful requests
        self._decreased_at = -float("inf")
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def limit(self) -> int:
        """Requests allowed in flight now (for metrics)."""
        return self._limit

    @property
    def ceiling(self) -> int:
        """The most the limit may grow to now."""
        return self._ceiling

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def set_ceiling(self, ceiling: int | None) -> None:
        """Cap the limit at ``ceiling`` (clamped to ``[minimum, maximum]``; None: maximum)."""
        ceiling = self.maximum if ceiling is None else min(max(ceiling, self.minimum), self.maximum)
        self._ceiling = ceiling
        if self._limit > ceiling:
            self._limit = ceiling

    async def acquire(self) -> float:
        """Wait for a slot; return the time it was granted (pass it to ``on_throttle``)."""
        if self._in_flight < self._limit and not self._waiters:
            self._in_flight += 1
            if self._in_flight >= self._limit:
                self._full = True
            return self._clock()
        self._full = True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted just as we were cancelled: hand the slot on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        return self._clock()

    def release(self) -> None:
        self._in_flight -= 1
        self._wake()

    def on_success(self) -> None:
        """Additive increase: +1 once ``limit`` requests in a row have succeeded while the
        gate was full at least once; +1 per such success in slow start."""
        self._successes += 1
        slow = self._limit < self._slow_start_limit
        if not slow and self._successes < self._limit:
            return
        self._successes = 0
        if self._full and self._limit < self._ceiling:
            self._limit += 1
            self._full = self._in_flight >= self._limit or bool(self._waiters)
            log.debug("concurrency limit raised", limit=self._limit)
            self._wake()

    def observe(self, seconds: float) -> None:
        """A successful request's latency: the round trip that spaces two decreases."""
        rtt = self._round_trip_s
        self._round_trip_s = seconds if rtt is None else rtt + 0.2 * (seconds - rtt)

    def on_throttle(self, sent_at: float | None = None) -> None:
        """Multiplicative decrease on a 429 or a timeout, at most once per wave."""
        self._successes = 0
        now = self._clock()
        window = self.window_s
        if self._round_trip_s is not None:
            window = min(window, self._round_trip_s)
        if now - self._decreased_at < window:
            return
        if sent_at is not None and sent_at < self._decreased_at:
            return
        self._decreased_at = now
        self._slow_start_limit = 0  # the provider's capacity is found: additive from here
        new = max(self.minimum, self._limit // 2)
        if new != self._limit:
            log.info("concurrency limit lowered", limit=new, was=self._limit)
            self._limit = new

    def _wake(self) -> None:
        while self._waiters and self._in_flight < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._in_flight += 1
                waiter.set_result(None)
        if self._waiters or self._in_flight >= self._limit:
            self._full = True
