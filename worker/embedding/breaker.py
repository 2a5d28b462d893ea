"""Circuit breaker: stop sending while the provider is down, then probe it with one request.

Retrying every batch against a dead endpoint only adds load when it comes back and fills
the logs. After ``failures`` consecutive transient failures (5xx, timeouts, resets) the
breaker opens: callers wait (their items are not bad, so nothing fails or is dead-lettered),
no request is sent for ``cooldown_s``, then one probe goes out. Its success closes the
breaker; its failure re-opens it for another cool-down.

Any answer from the provider (a 429, a 400, a 401) proves it is up, so callers record those
as successes here: throttling is the rate limiter's and the adaptive concurrency's job.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

import structlog

from worker.embedding.ratelimit import Clock, Sleep

log = structlog.get_logger(__name__)

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    def __init__(
        self,
        failures: int,
        cooldown_s: float,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if failures < 1 or cooldown_s < 0:
            raise ValueError("need failures >= 1 and cooldown_s >= 0")
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._sleep = sleep
        self._state: State = "closed"
        self._consecutive = 0
        self._opened_at = 0.0
        self._probing = False
        self._changed = asyncio.Event()

    @property
    def state(self) -> State:
        return self._state

    @property
    def cooling(self) -> bool:
        """Open and still in its cool-down: a request now would wait for it (a caller that
        must not wait, e.g. dual write's, skips instead; after it, one probe goes out)."""
        return self._state == "open" and self._clock() < self._opened_at + self.cooldown_s

    async def acquire(self) -> bool:
        """Wait until a request may be sent. True: it is the half-open probe, and the caller
        must report its outcome (``record_*``) or give the turn back (``cancel_probe``)."""
        while True:
            if self._state == "closed":
                return False
            if self._state == "open":
                remaining = self._opened_at + self.cooldown_s - self._clock()
                if remaining > 0:
                    await self._sleep(remaining)
                    continue
                self._state = "half_open"
                log.info("circuit half-open, sending a probe")
            if not self._probing:
                self._probing = True
                return True
            changed = self._changed
            await changed.wait()  # the probe's outcome

    def record_success(self) -> None:
        """The provider answered (whatever the status)."""
        self._consecutive = 0
        if self._state == "half_open":
            self._state = "closed"
            self._probing = False
            log.info("circuit closed, provider answering again")
            self._notify()

    def record_failure(self) -> None:
        """A 5xx, a timeout or a reset."""
        if self._state == "open":
            return  # a straggler sent before the breaker opened: the cool-down stands
        if self._state == "half_open":
            self._open("probe failed")
            return
        self._consecutive += 1
        if self._consecutive >= self.failures:
            self._open(f"{self._consecutive} consecutive failures")

    def cancel_probe(self) -> None:
        """The probe ended without an outcome (cancelled): let another caller probe."""
        if self._probing:
            self._probing = False
            self._notify()

    def _open(self, why: str) -> None:
        self._state = "open"
        self._opened_at = self._clock()
        self._consecutive = 0
        self._probing = False
        log.warning("circuit open, pausing requests", reason=why, cooldown_s=self.cooldown_s)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
