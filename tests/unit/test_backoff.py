"""worker.backoff: the capped exponential of the service waits and the jittered provider retry."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from worker.backoff import capped, jittered


def test_capped_doubles_from_initial_up_to_the_cap() -> None:
    # The Postgres/Kafka/registry waits: 0.1 s doubling to at most 10 s.
    assert [capped(a, 0.1, 10.0) for a in range(9)] == [
        0.1,
        0.2,
        0.4,
        0.8,
        1.6,
        3.2,
        6.4,
        10.0,
        10.0,
    ]


def test_capped_survives_a_very_long_outage() -> None:
    assert capped(100_000, 0.2, 10.0) == 10.0


@given(
    attempt=st.integers(0, 60),
    initial=st.floats(0.001, 5.0),
    cap=st.floats(0.001, 60.0),
    retry_after=st.none() | st.floats(0.0, 120.0),
)
def test_jittered_bounds(
    attempt: int, initial: float, cap: float, retry_after: float | None
) -> None:
    delay = jittered(attempt, initial, cap, retry_after)
    assert 0.0 <= delay <= max(cap, retry_after or 0.0)
    assert delay <= max(initial * 2**attempt, retry_after or 0.0)
    if retry_after is not None:
        assert delay >= retry_after


def test_jittered_is_jittered() -> None:
    delays = {jittered(5, 0.5, 30.0, None) for _ in range(50)}
    assert len(delays) > 40
    assert max(delays) <= 16.0


def test_jittered_survives_a_very_long_outage() -> None:
    assert jittered(1100, 0.5, 30.0, None) <= 30.0
