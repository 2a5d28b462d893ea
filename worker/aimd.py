"""Adaptive concurrency (AIMD): find how many requests the provider takes in parallel.

The configured maximum is a guess; a provider under load answers 429 or stops answering in
time long before any documented limit. As TCP does with its window, the limit grows by one
per round of successes (one success per slot) and halves on a throttle or a timeout. A burst of
429s from one wave of requests halves it once: throttles are ignored for a short window after a
decrease and for requests sent before it (they were answered for the old limit).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import structlog

from worker.ratelimit import Clock

log = structlog.get_logger(__name__)


class AdaptiveConcurrency:
    """A FIFO gate for in-flight requests whose size moves within ``[minimum, maximum]``."""

    def __init__(
        self,
        minimum: int,
        maximum: int,
        *,
        window_s: float = 1.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError(f"need 1 <= minimum ({minimum}) <= maximum ({maximum})")
        self.minimum = minimum
        self.maximum = maximum
        self.window_s = window_s
        self._clock = clock
        self._limit = maximum
        self._in_flight = 0
        self._successes = 0
        self._decreased_at = -float("inf")
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def limit(self) -> int:
        """Requests allowed in flight now (for metrics)."""
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def acquire(self) -> float:
        """Wait for a slot; return the time it was granted (pass it to ``on_throttle``)."""
        if self._in_flight < self._limit and not self._waiters:
            self._in_flight += 1
            return self._clock()
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
        """Additive increase: +1 once ``limit`` requests in a row have succeeded."""
        self._successes += 1
        if self._successes >= self._limit:
            self._successes = 0
            if self._limit < self.maximum:
                self._limit += 1
                log.debug("concurrency limit raised", limit=self._limit)
                self._wake()

    def on_throttle(self, sent_at: float | None = None) -> None:
        """Multiplicative decrease on a 429 or a timeout, at most once per wave."""
        self._successes = 0
        now = self._clock()
        if now - self._decreased_at < self.window_s:
            return
        if sent_at is not None and sent_at < self._decreased_at:
            return
        self._decreased_at = now
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
