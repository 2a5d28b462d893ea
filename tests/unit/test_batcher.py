"""MicroBatcher: max texts, token budget, linger, text types; driven by an injected clock."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.factories import upsert
from worker.events import TextType
from worker.model import Change
from worker.pipeline.batch import MicroBatcher

_offsets = itertools.count()


def change(tokens: int = 1, text_type: TextType = TextType.DOCUMENT) -> Change:
    offset = next(_offsets)
    return upsert(offset, f"text {offset}", text_type=text_type, tokens=tokens)


def test_flush_at_max_texts() -> None:
    b = MicroBatcher(max_texts=3, max_tokens=1000, linger_s=10.0)
    items = [change() for _ in range(7)]
    out = [b.add(c, now=0.0) for c in items]
    assert [len(r) for r in out] == [0, 0, 1, 0, 0, 1, 0]
    assert out[2] == [items[:3]] and out[5] == [items[3:6]]
    assert len(b) == 1
    assert b.drain() == [items[6:]]
    assert len(b) == 0 and b.next_deadline() is None


def test_flush_when_the_budget_is_reached_exactly() -> None:
    b = MicroBatcher(max_texts=10, max_tokens=10, linger_s=10.0)
    first, second = change(4), change(6)
    assert b.add(first, 0.0) == []
    assert b.add(second, 0.0) == [[first, second]]
    assert len(b) == 0


def test_text_over_budget_closes_the_open_batch_first() -> None:
    b = MicroBatcher(max_texts=10, max_tokens=10, linger_s=10.0)
    a, c = change(4), change(4)
    assert b.add(a, 0.0) == [] and b.add(c, 0.0) == []
    big = change(5)  # 4 + 4 + 5 > 10: [a, c] leaves, big starts a new batch
    assert b.add(big, 1.0) == [[a, c]]
    assert len(b) == 1
    assert b.next_deadline() == 11.0  # the new batch started when big arrived
    assert b.drain() == [[big]]


def test_single_text_over_budget_goes_alone() -> None:
    b = MicroBatcher(max_texts=10, max_tokens=10, linger_s=10.0)
    small, huge = change(3), change(50)
    assert b.add(small, 0.0) == []
    assert b.add(huge, 0.0) == [[small], [huge]]
    assert len(b) == 0
    assert b.add(change(50), 0.0) != []  # alone from the start: out at once


def test_linger_via_due_and_next_deadline() -> None:
    b = MicroBatcher(max_texts=10, max_tokens=1000, linger_s=0.5)
    assert b.next_deadline() is None
    assert b.due(100.0) == []
    first = change()
    b.add(first, now=10.0)
    b.add(second := change(), now=10.3)
    assert b.next_deadline() == 10.5
    assert b.due(10.49) == []
    assert b.due(10.5) == [[first, second]]
    assert b.next_deadline() is None and len(b) == 0


def test_text_types_never_share_a_batch() -> None:
    b = MicroBatcher(max_texts=2, max_tokens=1000, linger_s=1.0)
    d1, q1, d2, q2 = (
        change(text_type=TextType.DOCUMENT),
        change(text_type=TextType.QUERY),
        change(text_type=TextType.DOCUMENT),
        change(text_type=TextType.QUERY),
    )
    assert b.add(d1, 0.0) == []
    assert b.add(q1, 0.5) == []
    assert len(b) == 2
    assert b.add(d2, 0.6) == [[d1, d2]]
    assert b.next_deadline() == 1.5  # only the query batch is open
    assert b.add(q2, 0.7) == [[q1, q2]]


def test_due_closes_only_expired_batches() -> None:
    b = MicroBatcher(max_texts=10, max_tokens=1000, linger_s=1.0)
    d = change(text_type=TextType.DOCUMENT)
    q = change(text_type=TextType.QUERY)
    b.add(d, 0.0)
    b.add(q, 0.8)
    assert b.next_deadline() == 1.0
    assert b.due(1.0) == [[d]]
    assert b.next_deadline() == 1.8
    assert b.due(1.8) == [[q]]


def test_drain_returns_every_open_batch() -> None:
    b = MicroBatcher(max_texts=10, max_tokens=1000, linger_s=1.0)
    d = [change(text_type=TextType.DOCUMENT) for _ in range(3)]
    q = [change(text_type=TextType.QUERY) for _ in range(2)]
    for c in [*d, *q]:
        b.add(c, 0.0)
    drained = b.drain()
    assert sorted(drained, key=len) == [q, d]
    assert b.drain() == [] and len(b) == 0


@settings(max_examples=200, deadline=None)
@given(
    max_texts=st.integers(1, 12),
    max_tokens=st.integers(1, 100),
    linger=st.floats(0.0, 2.0),
    steps=st.lists(
        st.tuples(
            st.integers(0, 150), st.sampled_from(TextType), st.floats(0.0, 1.0), st.booleans()
        ),
        max_size=60,
    ),
)
def test_batches_respect_limits_and_keep_every_item_once_in_order(
    max_texts: int,
    max_tokens: int,
    linger: float,
    steps: list[tuple[int, TextType, float, bool]],
) -> None:
    b = MicroBatcher(max_texts=max_texts, max_tokens=max_tokens, linger_s=linger)
    now = 0.0
    added: list[Change] = []
    batches: list[list[Change]] = []
    for tokens, text_type, dt, poll in steps:
        now += dt
        if poll:
            deadline = b.next_deadline()
            expired = b.due(now)
            if deadline is None or now < deadline - 1e-9:
                assert expired == []
            elif now > deadline + 1e-9:
                assert expired
            batches += expired
        c = change(tokens, text_type)
        added.append(c)
        batches += b.add(c, now)
        assert len(b) == len(added) - sum(len(x) for x in batches)
    batches += b.drain()
    assert len(b) == 0

    for batch in batches:
        assert batch
        assert len(batch) <= max_texts
        assert len(batch) == 1 or sum(c.tokens for c in batch) <= max_tokens
        assert len({c.text_type for c in batch}) == 1
    flat = [c.offset for batch in batches for c in batch]
    assert sorted(flat) == [c.offset for c in added]  # nothing lost, nothing twice
    for text_type in TextType:
        emitted = [c.offset for batch in batches for c in batch if c.text_type is text_type]
        assert emitted == [c.offset for c in added if c.text_type is text_type]
