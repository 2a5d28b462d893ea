"""Which offset may be stored: the first one whose work is not yet durable, per partition.

Events finish out of order (batches embed concurrently); an offset may only advance past
events that are stored. Each assignment of a partition gets a new epoch, so work fetched
before a rebalance can be recognised and discarded instead of storing a stale offset.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

TP = tuple[str, int]


class Positioned(Protocol):
    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def epoch(self) -> int: ...


@dataclass
class _Partition:
    epoch: int
    pending: deque[int] = field(default_factory=deque)
    done: set[int] = field(default_factory=set)
    next_offset: int | None = None


class OffsetTracker:
    def __init__(self) -> None:
        self._parts: dict[TP, _Partition] = {}
        self._epochs = 0

    @property
    def in_flight(self) -> int:
        return sum(len(p.pending) for p in self._parts.values())

    def pending(self, tp: TP) -> int:
        part = self._parts.get(tp)
        return 0 if part is None else len(part.pending)

    def first_unsettled(self, tp: TP) -> int | None:
        """The first offset not yet durable (what lag is measured from); None if unknown."""
        part = self._parts.get(tp)
        if part is None:
            return None
        return part.pending[0] if part.pending else part.next_offset

    def read_to(self, tp: TP) -> int | None:
        """The offset after the last one tracked (or the assigned position); None if unknown."""
        part = self._parts.get(tp)
        return None if part is None else part.next_offset

    def assign(self, tp: TP, position: int | None = None) -> int:
        """Start a new epoch; records below a known ``position`` are ignored as re-deliveries."""
        self._epochs += 1
        self._parts[tp] = _Partition(epoch=self._epochs, next_offset=position)
        return self._epochs

    def revoke(self, tp: TP) -> None:
        self._parts.pop(tp, None)

    def epoch(self, tp: TP) -> int | None:
        part = self._parts.get(tp)
        return None if part is None else part.epoch

    def track(self, tp: TP, offset: int) -> bool:
        """Record a fetched offset; False for a re-delivery already tracked in this epoch."""
        part = self._parts[tp]
        if part.next_offset is not None and offset < part.next_offset:
            return False
        part.pending.append(offset)
        part.next_offset = offset + 1
        return True

    def is_current(self, item: Positioned) -> bool:
        part = self._parts.get((item.topic, item.partition))
        return part is not None and part.epoch == item.epoch

    def in_order(self, items: Sequence[Positioned]) -> list[bool]:
        """For each of ``items``, whether every offset before it in its partition that is not
        durable yet is among ``items`` too: writing just those keeps each partition's stream
        order (an item of another epoch, or of a partition no longer assigned, is dropped by
        its writer anyway: True)."""
        ready: dict[TP, set[int]] = {}
        for item in items:
            ready.setdefault((item.topic, item.partition), set()).add(item.offset)
        upto: dict[TP, int | None] = {}
        for tp, offsets in ready.items():
            part = self._parts.get(tp)
            first_missing = None
            if part is not None:
                for offset in part.pending:
                    if offset not in part.done and offset not in offsets:
                        first_missing = offset
                        break
            upto[tp] = first_missing
        out = []
        for item in items:
            tp = (item.topic, item.partition)
            limit = upto[tp]
            out.append(not self.is_current(item) or limit is None or item.offset < limit)
        return out

    def plan(self, items: Iterable[Positioned]) -> dict[TP, int]:
        """Offsets to store if ``items`` become durable now (nothing is changed yet)."""
        settling: dict[TP, set[int]] = {}
        for item in items:
            settling.setdefault((item.topic, item.partition), set()).add(item.offset)
        planned: dict[TP, int] = {}
        for tp, offsets in settling.items():
            part = self._parts[tp]
            position = part.next_offset
            for offset in part.pending:
                if offset not in part.done and offset not in offsets:
                    position = offset
                    break
            assert position is not None
            planned[tp] = position
        return planned

    def complete(self, items: Iterable[Positioned]) -> None:
        """Mark ``items`` durable and forget the settled prefix of each partition."""
        touched = set()
        for item in items:
            tp = (item.topic, item.partition)
            part = self._parts.get(tp)
            if part is None or part.epoch != item.epoch:
                continue
            part.done.add(item.offset)
            touched.add(tp)
        for tp in touched:
            part = self._parts[tp]
            while part.pending and part.pending[0] in part.done:
                part.done.discard(part.pending.popleft())
