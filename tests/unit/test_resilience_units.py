"""Rate limiter, adaptive concurrency and circuit breaker on a virtual clock (no real waiting)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable

import pytest

from worker.embedding.breaker import CircuitBreaker
from worker.embedding.concurrency import QUOTA_HEADROOM, AdaptiveConcurrency, quota_ceiling
from worker.embedding.ratelimit import RateLimiter, TokenBucket


class VirtualClock:
    """Time moves only when the test calls ``advance``; sleepers wake in deadline order."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + delay, next(self._seq), waiter))
        await waiter

    async def advance(self, seconds: float) -> None:
        target = self.now + seconds
        while self._sleepers and self._sleepers[0][0] <= target + 1e-9:
            when, _, waiter = heapq.heappop(self._sleepers)
            self.now = max(self.now, when)
            if not waiter.done():
                waiter.set_result(None)
            await settle()
        self.now = target
        await settle()


async def settle() -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(20):
        await asyncio.sleep(0)


def start(coro: Awaitable[object]) -> asyncio.Task[object]:
    async def wrap() -> object:
        return await coro

    return asyncio.ensure_future(wrap())


# --- token buckets ---------------------------------------------------------------------------


async def test_rpm_burst_is_one_seconds_worth_then_smoothed() -> None:
    clock = VirtualClock()
    limiter = RateLimiter(rpm=600, clock=clock, sleep=clock.sleep)  # 10/s, not 600 at once
    for _ in range(10):
        assert await limiter.acquire(0) == 0.0
    eleventh = start(limiter.acquire(0))
    await settle()
    assert not eleventh.done()
    assert clock.sleeps == [pytest.approx(0.1)]  # one timed sleep, no polling
    await clock.advance(0.099)
    assert not eleventh.done()
    await clock.advance(0.001)
    assert eleventh.done() and eleventh.result() == pytest.approx(0.1)


async def test_rpm_average_rate_holds() -> None:
    clock = VirtualClock()
    limiter = RateLimiter(rpm=120, clock=clock, sleep=clock.sleep)  # 2/s, burst 2
    done = [start(limiter.acquire(0)) for _ in range(8)]
    await settle()
    assert sum(t.done() for t in done) == 2
    await clock.advance(1.0)
    assert sum(t.done() for t in done) == 4
    await clock.advance(2.0)
    assert all(t.done() for t in done)


async def test_rpm_below_sixty_still_admits_one_request() -> None:
    clock = VirtualClock()
    limiter = RateLimiter(rpm=30, clock=clock, sleep=clock.sleep)  # one every 2 s
    await limiter.acquire(0)
    second = start(limiter.acquire(0))
    await clock.advance(1.9)
    assert not second.done()
    await clock.advance(0.1)
    assert second.done()


async def test_tpm_waits_for_the_tokens_of_the_batch() -> None:
    clock = VirtualClock()
    limiter = RateLimiter(tpm=6000, clock=clock, sleep=clock.sleep)  # 100 tokens/s, burst 100
    assert await limiter.acquire(60) == 0.0
    second = start(limiter.acquire(60))  # 40 left: needs 20 more = 0.2 s
    await clock.advance(0.19)
    assert not second.done()
    await clock.advance(0.01)
    assert second.done()


async def test_big_single_request_passes_from_a_full_bucket_and_leaves_debt() -> None:
    clock = VirtualClock()
    limiter = RateLimiter(tpm=600, clock=clock, sleep=clock.sleep)  # 10/s, burst 10
    assert await limiter.acquire(500) == 0.0  # 50x the burst, yet admitted at once
    assert limiter.tokens is not None and limiter.tokens.level == pytest.approx(-490)
    small = start(limiter.acquire(1))  # the debt is paid first: (1 + 490) / 10 s
    await clock.advance(49.0)
    assert not small.done()
    await clock.advance(0.1)
    assert small.done()


async def test_usage_correction_refunds_and_charges() -> None:
    clock = VirtualClock()
    limiter = RateLimiter(tpm=6000, clock=clock, sleep=clock.sleep)
    await limiter.acquire(100)
    limiter.correct(estimated=100, reported=40)  # the estimate was 60 too high
    assert await limiter.acquire(60) == 0.0
    limiter.correct(estimated=60, reported=110)  # now 50 too low: debt
    assert limiter.tokens is not None and limiter.tokens.level == pytest.approx(-50)
    limiter.correct(estimated=10, reported=None)  # no usage reported: nothing to correct
    assert limiter.tokens.level == pytest.approx(-50)
    late = start(limiter.acquire(10))
    await clock.advance(0.59)
    assert not late.done()
    await clock.advance(0.01)
    assert late.done()


def test_refund_never_exceeds_the_burst() -> None:
    clock = VirtualClock()
    bucket = TokenBucket(6000, clock)
    bucket.adjust(-1000)
    assert bucket.level == pytest.approx(100)


async def test_waiters_are_served_in_arrival_order() -> None:
    clock = VirtualClock()
    limiter = RateLimiter(tpm=6000, clock=clock, sleep=clock.sleep)
    await limiter.acquire(100)  # empty
    order: list[str] = []

    async def take(name: str, tokens: int) -> None:
        await limiter.acquire(tokens)
        order.append(name)

    big = start(take("big", 100))  # needs 1 s
    small = start(take("small", 1))  # would fit after 0.01 s, but arrived second
    await clock.advance(0.5)
    assert order == []
    await clock.advance(0.5)
    await clock.advance(0.01)
    assert order == ["big", "small"]
    assert big.done() and small.done()


async def test_rpm_and_tpm_together_wait_for_the_scarcer() -> None:
    clock = VirtualClock()
    limiter = RateLimiter(rpm=60, tpm=60_000, clock=clock, sleep=clock.sleep)
    await limiter.acquire(10)
    second = start(limiter.acquire(10))  # tokens plenty, requests 1/s
    await clock.advance(0.9)
    assert not second.done()
    await clock.advance(0.1)
    assert second.done()


async def test_unlimited_never_waits() -> None:
    clock = VirtualClock()
    limiter = RateLimiter(clock=clock, sleep=clock.sleep)
    for _ in range(1000):
        await limiter.acquire(1_000_000)
    assert clock.sleeps == []


async def test_a_retry_after_holds_every_request_until_it_passes() -> None:
    """With or without a quota configured: the provider's own quota is the account's."""
    for quota in ({}, {"rpm": 6000}):
        clock = VirtualClock()
        limiter = RateLimiter(**quota, clock=clock, sleep=clock.sleep)
        await limiter.acquire(1)
        limiter.hold(0.5)
        limiter.hold(0.2)  # a shorter one later does not shorten it
        first, second = start(limiter.acquire(1)), start(limiter.acquire(1))
        await settle()
        await clock.advance(0.4)
        assert not first.done() and not second.done(), quota
        await clock.advance(0.1)
        assert first.done() and second.done(), quota
        await limiter.acquire(1)  # past it: no wait
        assert sum(clock.sleeps) == pytest.approx(0.5), quota


async def test_cancelled_waiter_takes_nothing_and_unblocks_the_queue() -> None:
    clock = VirtualClock()
    limiter = RateLimiter(rpm=60, clock=clock, sleep=clock.sleep)
    await limiter.acquire(0)
    first = start(limiter.acquire(0))
    second = start(limiter.acquire(0))
    await settle()
    first.cancel()
    await settle()
    await clock.advance(1.0)
    assert second.done() and not second.cancelled()


# --- adaptive concurrency --------------------------------------------------------------------


def test_aimd_starts_at_max_and_halves_once_per_window() -> None:
    clock = VirtualClock()
    gate = AdaptiveConcurrency(1, 8, window_s=1.0, clock=clock)
    assert gate.limit == 8
    gate.on_throttle()
    assert gate.limit == 4
    for _ in range(5):  # the rest of the same wave
        gate.on_throttle()
    assert gate.limit == 4
    clock.now = 1.0
    gate.on_throttle()
    assert gate.limit == 2


def test_aimd_halves_at_most_once_per_round_trip_once_it_is_known() -> None:
    clock = VirtualClock()
    gate = AdaptiveConcurrency(1, 64, window_s=1.0, clock=clock)
    gate.observe(0.1)
    gate.on_throttle(sent_at=0.0)
    assert gate.limit == 32
    clock.now = 0.05
    gate.on_throttle(sent_at=0.01)  # within the round trip: the same wave
    assert gate.limit == 32
    clock.now = 0.12
    gate.on_throttle(sent_at=0.02)  # sent after the decrease, a round trip later
    assert gate.limit == 16


def test_aimd_ignores_throttles_of_requests_sent_before_the_decrease() -> None:
    clock = VirtualClock()
    gate = AdaptiveConcurrency(1, 8, window_s=0.5, clock=clock)
    gate.on_throttle(sent_at=0.0)
    clock.now = 5.0  # long after the window: a slow timeout of the old wave
    gate.on_throttle(sent_at=-1.0)
    assert gate.limit == 4
    gate.on_throttle(sent_at=5.0)
    assert gate.limit == 2


async def busy_successes(gate: AdaptiveConcurrency, n: int) -> None:
    """``n`` requests succeed while more wait than the limit admits (the gate stays full)."""
    for _ in range(n):
        while gate.in_flight < gate.limit:
            await gate.acquire()
        gate.release()
        gate.on_success()


async def test_aimd_bounds() -> None:
    clock = VirtualClock()
    gate = AdaptiveConcurrency(3, 8, window_s=0.0, clock=clock)
    for _ in range(5):
        gate.on_throttle()
    assert gate.limit == 3
    await busy_successes(gate, 1000)
    assert gate.limit == 8


async def test_aimd_additive_increase_needs_a_round_of_successes() -> None:
    clock = VirtualClock()
    gate = AdaptiveConcurrency(1, 8, clock=clock)
    gate.on_throttle()
    assert gate.limit == 4
    await busy_successes(gate, 3)
    assert gate.limit == 4
    await busy_successes(gate, 1)
    assert gate.limit == 5
    await busy_successes(gate, 4)
    assert gate.limit == 5
    await busy_successes(gate, 1)
    assert gate.limit == 6


async def test_aimd_throttle_restarts_the_round() -> None:
    clock = VirtualClock()
    gate = AdaptiveConcurrency(1, 8, clock=clock)
    gate.on_throttle()
    await busy_successes(gate, 3)
    gate.on_throttle()  # inside the window: no decrease, but the round starts over
    await busy_successes(gate, 1)
    assert gate.limit == 4


async def test_aimd_grows_past_its_initial_limit_while_it_is_in_use() -> None:
    gate = AdaptiveConcurrency(1, 256, initial=16, slow_start_limit=0, clock=VirtualClock())
    assert gate.limit == 16 and gate.ceiling == 256
    await busy_successes(gate, 16)
    assert gate.limit == 17
    await busy_successes(gate, 17 + 18)
    assert gate.limit == 19


async def test_aimd_slow_start_doubles_per_round_up_to_its_cap_then_adds_one() -> None:
    gate = AdaptiveConcurrency(1, 256, initial=16, slow_start_limit=64, clock=VirtualClock())
    await busy_successes(gate, 16)  # one round trip's worth of successes at 16
    assert gate.limit == 32
    await busy_successes(gate, 32)
    assert gate.limit == 64  # the cap: additive from here
    await busy_successes(gate, 63)
    assert gate.limit == 64
    await busy_successes(gate, 1)
    assert gate.limit == 65


async def test_aimd_slow_start_ends_at_the_first_throttle() -> None:
    clock = VirtualClock()
    gate = AdaptiveConcurrency(1, 256, initial=32, slow_start_limit=64, clock=clock)
    gate.on_throttle()
    assert gate.limit == 16
    await busy_successes(gate, 16)
    assert gate.limit == 17  # one per round, not one per success


async def test_aimd_does_not_grow_while_demand_stays_below_the_limit() -> None:
    # In slow start (the default cap, 64, is above 16) as after it: a gate never full proves
    # nothing about the provider.
    gate = AdaptiveConcurrency(1, 256, initial=16, clock=VirtualClock())
    for _ in range(1000):  # 15 requests at a time at most: the 16th slot is never used
        for _ in range(15):
            await gate.acquire()
        for _ in range(15):
            gate.release()
            gate.on_success()
    assert gate.limit == 16


def test_aimd_initial_limit_is_clamped_to_the_bounds() -> None:
    assert AdaptiveConcurrency(1, 4, initial=16).limit == 4
    assert AdaptiveConcurrency(8, 64, initial=2).limit == 8
    assert AdaptiveConcurrency(1, 8).limit == 8  # no initial: the maximum


async def test_aimd_ceiling_caps_the_limit_and_its_growth() -> None:
    gate = AdaptiveConcurrency(2, 256, initial=16, clock=VirtualClock())
    gate.set_ceiling(10)
    assert gate.limit == 10 and gate.ceiling == 10
    await busy_successes(gate, 500)
    assert gate.limit == 10
    gate.set_ceiling(12)
    await busy_successes(gate, 500)
    assert gate.limit == 12
    gate.set_ceiling(0)  # never below the minimum
    assert gate.limit == 2 and gate.ceiling == 2
    gate.set_ceiling(None)  # the configured maximum again
    assert gate.ceiling == 256


def test_quota_ceiling_is_rate_times_latency_with_headroom() -> None:
    assert QUOTA_HEADROOM == 2.0
    assert quota_ceiling(None, None, 230.0, 0.1) is None  # no quota: no ceiling from it
    assert quota_ceiling(6_000, None, 230.0, 0.1) == 20  # 100 requests/s x 0.1 s x 2
    # TPM binds: 1,118,020 / 60 / 233 tokens = 80 requests/s x 0.1 s x 2 = 16.
    assert quota_ceiling(6_000, 1_118_020, 233.0, 0.1) == 16
    assert quota_ceiling(None, 60_000, 1_000.0, 0.25) == 1  # 1 request/s x 0.25 s x 2
    assert quota_ceiling(6_000, None, 0.0, 2.0) == 400


def test_aimd_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        AdaptiveConcurrency(5, 4)
    with pytest.raises(ValueError):
        AdaptiveConcurrency(0, 4)


async def test_gate_holds_requests_beyond_the_limit() -> None:
    clock = VirtualClock()
    gate = AdaptiveConcurrency(1, 2, clock=clock)
    await gate.acquire()
    await gate.acquire()
    third = start(gate.acquire())
    await settle()
    assert not third.done() and gate.in_flight == 2
    gate.release()
    await settle()
    assert third.done() and gate.in_flight == 2


async def test_gate_honours_a_lowered_limit() -> None:
    clock = VirtualClock()
    gate = AdaptiveConcurrency(1, 2, clock=clock)
    await gate.acquire()
    await gate.acquire()
    waiting = start(gate.acquire())
    gate.on_throttle()  # limit 1 with 2 in flight
    gate.release()
    await settle()
    assert not waiting.done()  # 1 in flight = the new limit
    gate.release()
    await settle()
    assert waiting.done() and gate.in_flight == 1


async def test_gate_serves_waiters_in_order_and_skips_cancelled_ones() -> None:
    clock = VirtualClock()
    gate = AdaptiveConcurrency(1, 1, clock=clock)
    await gate.acquire()
    first, second, third = (start(gate.acquire()) for _ in range(3))
    await settle()
    first.cancel()
    await settle()
    gate.release()
    await settle()
    assert second.done() and not third.done()
    assert gate.in_flight == 1


async def test_raising_the_limit_admits_a_waiter() -> None:
    clock = VirtualClock()
    gate = AdaptiveConcurrency(1, 2, clock=clock)
    gate.on_throttle()  # limit 1
    await gate.acquire()
    waiting = start(gate.acquire())
    await settle()
    assert not waiting.done()
    gate.on_success()  # a round at limit 1 is one success: limit 2
    await settle()
    assert gate.limit == 2 and waiting.done()


# --- circuit breaker -------------------------------------------------------------------------


def state(cb: CircuitBreaker) -> str:
    """Read the state afresh (mypy would keep a narrowed literal across calls)."""
    return cb.state


def breaker(clock: VirtualClock, failures: int = 3, cooldown: float = 10.0) -> CircuitBreaker:
    return CircuitBreaker(failures, cooldown, clock=clock, sleep=clock.sleep)


async def test_breaker_opens_after_n_consecutive_failures() -> None:
    clock = VirtualClock()
    cb = breaker(clock)
    cb.record_failure()
    cb.record_failure()
    cb.record_success()  # not consecutive
    cb.record_failure()
    cb.record_failure()
    assert state(cb) == "closed"
    assert await cb.acquire() is False
    cb.record_failure()
    assert state(cb) == "open"


async def test_open_breaker_holds_callers_for_the_cooldown_then_lets_one_probe() -> None:
    clock = VirtualClock()
    cb = breaker(clock)
    for _ in range(3):
        cb.record_failure()
    probe = start(cb.acquire())
    other = start(cb.acquire())
    await clock.advance(9.9)
    assert not probe.done() and not other.done()
    await clock.advance(0.1)
    assert state(cb) == "half_open"
    assert probe.done() and probe.result() is True
    assert not other.done()  # only one request while half-open
    cb.record_success()
    await settle()
    assert state(cb) == "closed"
    assert other.done() and other.result() is False


async def test_failed_probe_reopens_for_another_cooldown() -> None:
    clock = VirtualClock()
    cb = breaker(clock)
    for _ in range(3):
        cb.record_failure()
    probe = start(cb.acquire())
    other = start(cb.acquire())
    await clock.advance(10.0)
    assert probe.result() is True
    cb.record_failure()
    await settle()
    assert state(cb) == "open" and not other.done()
    await clock.advance(9.9)
    assert not other.done()
    await clock.advance(0.1)
    assert other.done() and other.result() is True  # the next probe


async def test_cancelled_probe_hands_the_turn_to_another_caller() -> None:
    clock = VirtualClock()
    cb = breaker(clock, failures=1, cooldown=1.0)
    cb.record_failure()
    await clock.advance(1.0)
    assert await cb.acquire() is True
    other = start(cb.acquire())
    await settle()
    assert not other.done()
    cb.cancel_probe()
    await settle()
    assert other.done() and other.result() is True


async def test_failures_while_open_do_not_extend_the_cooldown() -> None:
    clock = VirtualClock()
    cb = breaker(clock, failures=1, cooldown=1.0)
    cb.record_failure()
    await clock.advance(0.5)
    cb.record_failure()  # a straggler sent before the breaker opened
    waiter = start(cb.acquire())
    await clock.advance(0.5)
    assert waiter.done() and state(cb) == "half_open"
