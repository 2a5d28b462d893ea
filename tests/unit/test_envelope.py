"""The dead-letter envelope always fits its budget: copies cut fairly, with sizes and hashes."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.envelope import (
    DEFAULT_MAX_MESSAGE_BYTES,
    dead_letter,
    envelope_budget,
    headers_digest,
)
from worker.events import DeadLetter, Reason
from worker.model import Record

BUDGET = 20_000
Make = Callable[[int], Record]


def rec(
    key: bytes | None = b"k",
    value: bytes | None = b"{}",
    headers: tuple[tuple[str, bytes | None], ...] = (),
) -> Record:
    return Record("content", 2, 40, key, value, 1_700_000_000_000, headers)


PARTS: dict[str, Make] = {
    "key": lambda n: rec(key=b"k" * n),
    "value": lambda n: rec(value=b"v" * n),
    "one-header": lambda n: rec(headers=(("blob", b"h" * n),)),
    "many-headers": lambda n: rec(headers=tuple(("h", b"x" * 90) for _ in range(n // 91))),
}


def letter(r: Record, budget: int = BUDGET) -> DeadLetter:
    return dead_letter(r, Reason.INVALID_JSON, "the value is not JSON", budget=budget)


def size(x: DeadLetter) -> int:
    return len(x.model_dump_json())


def assert_describes(x: DeadLetter, r: Record) -> None:
    """Whatever was cut, the letter says what the original was and where to read it."""
    assert (x.source.topic, x.source.partition, x.source.offset) == (r.topic, r.partition, 40)
    assert x.source.timestamp_ms == r.timestamp_ms
    for part, raw in (("key", r.key), ("value", r.value)):
        copy, cut = getattr(x, f"{part}_b64"), getattr(x, f"{part}_truncated")
        assert getattr(x, f"{part}_size") == (None if raw is None else len(raw))
        assert getattr(x, f"{part}_sha256") == (
            None if raw is None else hashlib.sha256(raw).hexdigest()
        )
        if raw is None:
            assert copy is None and not cut
        else:
            assert copy is not None
            data = base64.b64decode(copy)
            assert raw.startswith(data) and (data == raw) is (not cut)
    copied = [
        (h.key, None if h.value_b64 is None else base64.b64decode(h.value_b64)) for h in x.headers
    ]
    whole = list(r.headers[: len(copied)])
    assert whole[:-1] == copied[:-1], "only the last header copied may be cut"
    if copied:
        (name, value), (copy_name, copy) = whole[-1], copied[-1]
        assert name == copy_name
        assert value == copy or (value is not None and copy is not None and value.startswith(copy))
    assert (copied != list(r.headers)) is x.headers_truncated
    assert x.headers_sha256 == headers_digest(r.headers)


def boundary(make: Make, budget: int = BUDGET) -> int:
    """The largest size whose letter still holds a whole copy."""
    lo, hi = 0, budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if not letter(make(mid), budget).cut:
            lo = mid
        else:
            hi = mid - 1
    return lo


@pytest.mark.parametrize("part", PARTS)
def test_just_under_the_budget_is_copied_whole_and_just_over_is_cut(part: str) -> None:
    make = PARTS[part]
    n = boundary(make)
    assert n > BUDGET // 2, "a part that fits must be copied whole"
    under, over = letter(make(n)), letter(make(n + 91))  # 91: one more of the many headers
    assert not under.cut and size(under) <= BUDGET
    assert over.cut and size(over) <= BUDGET
    assert_describes(under, make(n))
    assert_describes(over, make(n + 91))


@pytest.mark.parametrize("part", PARTS)
def test_a_record_at_the_producer_limit_fits_the_default_budget(part: str) -> None:
    """The main case: a record the broker took (1 MiB) is a 1.4 MB envelope, over it."""
    budget = envelope_budget(DEFAULT_MAX_MESSAGE_BYTES)
    r = PARTS[part](1_048_576)
    x = letter(r, budget)
    assert size(x) <= budget and x.cut
    assert_describes(x, r)
    # Most of the room went to the copy: cutting is no excuse for dropping everything.
    assert size(x) > budget * 0.9


def test_a_small_key_stays_whole_next_to_a_huge_value() -> None:
    r = rec(key=b"doc-7", value=b"v" * 100_000, headers=(("namespace", b"news"),))
    x = letter(r)
    assert x.value_truncated and not x.key_truncated and not x.headers_truncated
    assert_describes(x, r)


def test_long_message_and_out_of_range_names_do_not_escape_the_budget() -> None:
    r = rec(value=b"v" * 50_000)
    x = dead_letter(
        r, Reason.KEY_MISMATCH, "m" * 100_000, "c" * 1000, "n" * 10_000, "i" * 10_000, BUDGET
    )
    assert size(x) <= BUDGET
    assert len(x.message) <= 1000 and x.namespace is None and x.id is None


def test_stripped_letter_keeps_position_sizes_and_hashes() -> None:
    r = rec(key=b"k" * 5000, value=b"v" * 5000, headers=(("a", b"b"),))
    x = letter(r).stripped()
    assert size(x) < 2000 and x.cut
    assert x.key_truncated and x.value_truncated and x.headers_truncated
    assert_describes(x, r)


def test_stripping_a_cut_letter_keeps_it_cut() -> None:
    """The sink strips letters the topic still refuses, cut ones too: what was cut stays
    flagged, or replay would take the empty copies for the original."""
    r = rec(key=b"", value=None, headers=(("namespace", b"n" * 30_000),))
    cut = letter(r)
    assert cut.headers_truncated
    again = cut.model_copy(update={"headers": []}).stripped()
    assert again.cut and again.headers_truncated
    assert_describes(again, r)


def test_null_key_value_and_header_values_are_kept_apart_from_empty_ones() -> None:
    r = rec(key=None, value=None, headers=(("n", None), ("e", b"")))
    x = letter(r)
    assert not x.cut and x.key_b64 is None and x.value_b64 is None
    assert [(h.key, h.value_b64) for h in x.headers] == [("n", None), ("e", "")]
    assert headers_digest(r.headers) != headers_digest((("n", b""), ("e", b"")))


@settings(max_examples=200, deadline=None)
@given(
    key=st.none() | st.integers(0, 30_000),
    value=st.none() | st.integers(0, 60_000),
    headers=st.lists(
        st.tuples(st.text(max_size=20), st.none() | st.integers(0, 8_000)), max_size=40
    ),
    budget=st.integers(4_000, 40_000),
)
def test_any_record_fits_any_budget(
    key: int | None, value: int | None, headers: list[tuple[str, int | None]], budget: int
) -> None:
    r = rec(
        key=None if key is None else b"k" * key,
        value=None if value is None else b"\xff" * value,
        headers=tuple((n, None if v is None else b"h" * v) for n, v in headers),
    )
    x = letter(r, budget)
    assert size(x) <= budget
    assert_describes(x, r)
