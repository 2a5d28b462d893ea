"""OffsetTracker: only the first unfinished offset may be stored, per partition and epoch."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.pipeline.offsets import TP, OffsetTracker

A: TP = ("topic", 0)
B: TP = ("topic", 1)


@dataclass(frozen=True)
class Item:
    topic: str
    partition: int
    offset: int
    epoch: int


def items(tp: TP, epoch: int, *offsets: int) -> list[Item]:
    return [Item(tp[0], tp[1], o, epoch) for o in offsets]


def tracked(tp: TP, offsets: range, position: int | None = None) -> tuple[OffsetTracker, int]:
    tracker = OffsetTracker()
    epoch = tracker.assign(tp, position)
    for o in offsets:
        assert tracker.track(tp, o)
    return tracker, epoch


def test_plan_gives_the_first_unfinished_offset() -> None:
    tracker, epoch = tracked(A, range(10, 15))
    assert tracker.plan(items(A, epoch, 10)) == {A: 11}
    assert tracker.plan(items(A, epoch, 10, 11, 12)) == {A: 13}
    assert tracker.plan(items(A, epoch, 11, 12)) == {A: 10}  # 10 still in flight
    assert tracker.plan(items(A, epoch, 10, 11, 12, 13, 14)) == {A: 15}


def test_plan_does_not_mutate() -> None:
    tracker, epoch = tracked(A, range(5))
    assert tracker.plan(items(A, epoch, 0, 1)) == {A: 2}
    assert tracker.pending(A) == 5
    assert tracker.plan(items(A, epoch, 0)) == {A: 1}  # not {A: 2}: nothing was recorded
    assert tracker.in_flight == 5


def test_out_of_order_completion() -> None:
    tracker, epoch = tracked(A, range(5))
    assert tracker.plan(items(A, epoch, 3, 4)) == {A: 0}
    tracker.complete(items(A, epoch, 3, 4))
    assert tracker.pending(A) == 5  # nothing settled until 0 is done
    assert tracker.plan(items(A, epoch, 0)) == {A: 1}
    tracker.complete(items(A, epoch, 0))
    assert tracker.pending(A) == 4
    assert tracker.plan(items(A, epoch, 1, 2)) == {A: 5}  # 3 and 4 were already done
    tracker.complete(items(A, epoch, 2, 1))
    assert tracker.pending(A) == 0 and tracker.in_flight == 0


def test_in_order_releases_a_partition_only_up_to_its_first_missing_offset() -> None:
    """What an ordered writer may take: each partition's ready items before the first
    offset that is neither durable nor ready (batches embed out of order)."""
    tracker, epoch = tracked(A, range(6))
    epoch_b = tracker.assign(B, 0)
    assert tracker.track(B, 0)
    ready = items(A, epoch, 3, 4, 0, 1) + items(B, epoch_b, 0)
    assert tracker.in_order(ready) == [False, False, True, True, True]  # 2 is missing
    tracker.complete(items(A, epoch, 2))  # 2 durable (say, a dead letter written earlier)
    assert tracker.in_order(ready) == [True, True, True, True, True]
    # An item of an old epoch is let through: the writer drops it.
    tracker.revoke(A)
    tracker.assign(A, 0)
    assert tracker.in_order(items(A, epoch, 5)) == [True]


def test_complete_forgets_the_settled_prefix() -> None:
    tracker, epoch = tracked(A, range(100, 106))
    tracker.complete(items(A, epoch, 100, 101, 102, 104))
    assert tracker.pending(A) == 3  # 103, 104 (done, not yet settled), 105
    assert tracker.plan(items(A, epoch, 103)) == {A: 105}
    tracker.complete(items(A, epoch, 103))
    assert tracker.pending(A) == 1
    assert tracker.plan(items(A, epoch, 105)) == {A: 106}


def test_partitions_are_independent() -> None:
    tracker = OffsetTracker()
    ea, eb = tracker.assign(A), tracker.assign(B)
    assert ea != eb
    for o in range(3):
        tracker.track(A, o)
        tracker.track(B, o + 50)
    assert tracker.plan([*items(A, ea, 0), *items(B, eb, 50, 51)]) == {A: 1, B: 52}
    tracker.complete(items(B, eb, 50, 51, 52))
    assert tracker.pending(A) == 3 and tracker.pending(B) == 0 and tracker.in_flight == 3


def test_redelivery_is_ignored() -> None:
    tracker, _ = tracked(A, range(3))
    assert not tracker.track(A, 1)
    assert not tracker.track(A, 2)
    assert tracker.pending(A) == 3
    assert tracker.track(A, 3)
    assert tracker.pending(A) == 4


def test_known_assign_position_ignores_records_below_it() -> None:
    tracker = OffsetTracker()
    epoch = tracker.assign(A, position=40)
    assert not tracker.track(A, 38)
    assert not tracker.track(A, 39)
    assert tracker.pending(A) == 0
    assert tracker.track(A, 40)
    assert tracker.track(A, 42)  # gaps (compaction, transaction markers) are fine
    assert tracker.plan(items(A, epoch, 40)) == {A: 42}
    assert tracker.plan(items(A, epoch, 40, 42)) == {A: 43}


def test_unknown_position_accepts_the_first_record() -> None:
    tracker = OffsetTracker()
    tracker.assign(A)
    assert tracker.track(A, 1234)
    assert not tracker.track(A, 1000)


def test_old_epoch_is_not_current_after_revoke_and_assign() -> None:
    tracker, old = tracked(A, range(3))
    stale = items(A, old, 0, 1, 2)
    assert all(tracker.is_current(i) for i in stale)
    tracker.revoke(A)
    assert tracker.epoch(A) is None
    assert not any(tracker.is_current(i) for i in stale)
    new = tracker.assign(A, position=0)
    assert new != old and tracker.epoch(A) == new
    assert not any(tracker.is_current(i) for i in stale)
    assert tracker.track(A, 0)  # the new epoch fetches the same records again
    fresh = items(A, new, 0)
    assert tracker.is_current(fresh[0])
    tracker.complete(stale)  # ignored: it belongs to the previous assignment
    assert tracker.pending(A) == 1
    assert tracker.plan(fresh) == {A: 1}


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    start=st.integers(0, 1000),
    gaps=st.lists(st.integers(1, 3), min_size=1, max_size=40),
)
def test_plan_and_complete_match_a_model(data: st.DataObject, start: int, gaps: list[int]) -> None:
    offsets = [start + sum(gaps[:i]) for i in range(len(gaps))]
    tracker = OffsetTracker()
    epoch = tracker.assign(A, position=start)
    for o in offsets:
        assert tracker.track(A, o)
    order = data.draw(st.permutations(offsets))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(order)), max_size=6)) | {len(order)})
    done: set[int] = set()
    previous = 0
    for cut in cuts:
        chunk = items(A, epoch, *order[previous:cut])
        previous = cut
        planned = tracker.plan(chunk)
        done |= {i.offset for i in chunk}
        unfinished = [o for o in offsets if o not in done]
        assert planned == {A: unfinished[0] if unfinished else offsets[-1] + 1}
        tracker.complete(chunk)
        prefix = next((k for k, o in enumerate(offsets) if o not in done), len(offsets))
        assert tracker.pending(A) == len(offsets) - prefix
    assert tracker.in_flight == 0
