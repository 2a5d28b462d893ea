"""Client-side RPM/TPM limits, so the worker stays under the provider's quota instead of
learning it from 429s.

The provider enforces a per-minute quota per second (quota / 60 each second, about one second's
worth of burst), so the buckets here do the same: a minute's quota spent in the first second
would be refused anyway. A request bigger than the burst is let through from a full bucket and
leaves it in debt, so one large batch can pass and the average rate still holds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# Float slack, so a sleep of exactly the computed wait is enough.
_EPSILON = 1e-9


class TokenBucket:
    """Refills ``per_minute / 60`` per second, continuously, up to one second's worth."""

    def __init__(self, per_minute: float, clock: Clock = time.monotonic) -> None:
        if per_minute <= 0:
            raise ValueError("per_minute must be > 0")
        self.rate = per_minute / 60.0
        # At least one unit, or a quota under 60/min could never admit anything.
        self.capacity = max(self.rate, 1.0)
        self._clock = clock
        self._level = self.capacity
        self._stamp = clock()

    @property
    def level(self) -> float:
        """Units available now (negative: in debt after a large request or a correction)."""
        self._refill()
        return self._level

    def wait_time(self, cost: float) -> float:
        """Seconds until ``cost`` may be taken (0.0: now)."""
        self._refill()
        need = min(cost, self.capacity)
        if self._level + _EPSILON >= need:
            return 0.0
        return (need - self._level) / self.rate

    def take(self, cost: float) -> None:
        self._refill()
        self._level -= cost

    def adjust(self, extra: float) -> None:
        """Charge ``extra`` more units (negative: refund), never above capacity."""
        self._refill()
        self._level = min(self.capacity, self._level - extra)

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
        self._stamp = now


class RateLimiter:
    """Requests-per-minute and tokens-per-minute buckets behind one FIFO queue.

    One lock orders the callers: the head waits (one timed sleep, no polling) until both
    buckets can pay for it, so a big request is not starved by a stream of small ones.
    """

    def __init__(
        self,
        rpm: int | None = None,
        tpm: int | None = None,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.requests = TokenBucket(rpm, clock) if rpm is not None else None
        self.tokens = TokenBucket(tpm, clock) if tpm is not None else None
        self._clock = clock
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self._not_before = -float("inf")

    @property
    def unlimited(self) -> bool:
        """No quota configured (a provider's Retry-After still holds requests back)."""
        return self.requests is None and self.tokens is None

    def hold(self, seconds: float) -> None:
        """The provider asked for no request in the next ``seconds`` (a 429's Retry-After):
        every request waits for it, not only the refused one. Its quota is the account's,
        so the requests in between would only be refused too, each one an instant 429
        that frees its slot for the next (a storm of them, measured in benchmark scenario
        3 without the quota configured)."""
        self._not_before = max(self._not_before, self._clock() + seconds)

    async def acquire(self, tokens: int) -> float:
        """Wait for capacity for one request of ``tokens`` (estimated); return seconds waited."""
        if self.unlimited and self._clock() >= self._not_before:
            return 0.0
        waited = 0.0
        async with self._lock:
            while (delay := self._wait_time(tokens)) > 0:
                await self._sleep(delay)
                waited += delay
            if self.requests is not None:
                self.requests.take(1)
            if self.tokens is not None:
                self.tokens.take(tokens)
        return waited

    def correct(self, estimated: int, reported: int | None) -> None:
        """Settle the token bucket with the provider's count once the response is in."""
        if self.tokens is not None and reported is not None:
            self.tokens.adjust(reported - estimated)

    def _wait_time(self, tokens: int) -> float:
        waits = [0.0, self._not_before - self._clock()]
        if self.requests is not None:
            waits.append(self.requests.wait_time(1))
        if self.tokens is not None:
            waits.append(self.tokens.wait_time(tokens))
        return max(waits)
