"""``worker.kafka.unreadable.isolate`` against a consumer that fails as aiokafka does: a
poll that meets an unparsable record raises and leaves the partition's position where it was."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import TopicPartition
from aiokafka.errors import CorruptRecordException

from tests.pipeline_fakes import FakeStore, NoDeadLetters
from tests.unit.test_writer import InstantEmbedder
from worker.config import load_settings
from worker.events import Reason
from worker.kafka.unreadable import Unreadable, isolate
from worker.pipeline import runner as pl

T = "events"
P0, P1, P2 = (TopicPartition(T, p) for p in range(3))


@dataclass
class Rec:
    offset: int


class FakeConsumer:
    """Partitions as lists of offsets, None where a record cannot be parsed."""

    def __init__(self, logs: dict[TopicPartition, list[int | None]]) -> None:
        self.logs = logs
        self.positions = dict.fromkeys(logs, 0)
        self.polled: list[TopicPartition] = []
        self.paused_tps: set[TopicPartition] = set()
        self.transient: set[TopicPartition] = set()  # fails once, reads the next time
        self.on_poll: Callable[[], None] = lambda: None

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[object]]:
        [tp] = partitions
        self.polled.append(tp)
        self.on_poll()
        log, start = self.logs[tp], self.positions[tp]
        chunk = log[start : start + (max_records or len(log))]
        if None in chunk or tp in self.transient:
            self.transient.discard(tp)
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        self.positions[tp] = start + len(chunk)
        return {tp: [Rec(o) for o in chunk if o is not None]} if chunk else {}

    async def position(self, partition: TopicPartition) -> int:
        return self.positions[partition]

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.positions[partition] = offset

    def highwater(self, partition: TopicPartition) -> int | None:
        return len(self.logs[partition])

    def paused(self) -> set[TopicPartition]:
        return self.paused_tps

    def assignment(self) -> set[TopicPartition]:
        return set(self.logs)


def offsets(fetched: dict[TopicPartition, list[object]]) -> dict[int, list[int]]:
    return {tp.partition: [r.offset for r in rs] for tp, rs in fetched.items()}  # type: ignore[attr-defined]


async def test_the_records_before_it_are_read_it_is_found_and_skipped() -> None:
    consumer = FakeConsumer({P0: [0, 1, None, 3, 4]})
    fetched, found = await isolate(consumer, {P0: 0}, max_records=10)
    assert offsets(fetched) == {0: [0, 1]}
    assert found == [Unreadable(T, 0, 2, found[0].error)]
    assert found[0].error.startswith("UnicodeDecodeError: ")
    assert consumer.positions[P0] == 3  # past it: the next poll reads 3 and 4


async def test_what_the_failed_poll_drained_elsewhere_is_read_again() -> None:
    """The failed call had moved P1 on without returning its records: back to where the
    pipeline read to. A partition at its high-water mark or paused is not polled."""
    consumer = FakeConsumer({P0: [0, None], P1: [0, 1, 2], P2: [0]})
    consumer.positions.update({P1: 3, P2: 1})
    consumer.paused_tps = {P2}
    fetched, found = await isolate(consumer, {P0: 0, P1: 1, P2: 1}, max_records=10)
    assert offsets(fetched) == {0: [0], 1: [1, 2]}
    assert [(u.partition, u.offset) for u in found] == [(0, 1)]
    assert P2 not in consumer.polled


async def test_a_partition_at_its_high_water_mark_is_not_polled() -> None:
    consumer = FakeConsumer({P0: [0, None], P1: [0, 1]})
    consumer.positions[P1] = 2
    await isolate(consumer, {P0: 0, P1: 2}, max_records=10)
    assert P1 not in consumer.polled


async def test_an_error_that_does_not_come_back_skips_nothing() -> None:
    """A CRC error from a transfer: read one at a time, every record comes."""
    consumer = FakeConsumer({P0: [0, 1, 2]})
    consumer.transient = {P0}
    fetched, found = await isolate(consumer, {P0: 0}, max_records=10)
    assert (offsets(fetched), found) == ({0: [0, 1, 2]}, [])


async def test_stepping_reads_no_further_than_the_failed_poll_did() -> None:
    """The failed poll parsed at most ``max_records`` records: what is after them is left
    for the next poll."""
    consumer = FakeConsumer({P0: [0, 1, 2, None]})
    consumer.transient = {P0}
    fetched, found = await isolate(consumer, {P0: 0}, max_records=2)
    assert (offsets(fetched), found) == ({0: [0, 1]}, [])


def test_the_letter_has_no_copies_and_names_the_error() -> None:
    letter = Unreadable(
        T, 3, 7, "CorruptRecordException: " + str(CorruptRecordException())
    ).letter()
    assert letter.reason is Reason.UNREADABLE_RECORD
    assert (letter.source.topic, letter.source.partition, letter.source.offset) == (T, 3, 7)
    assert (letter.key_b64, letter.value_b64, letter.headers, letter.cut) == (None, None, [], False)
    assert "CorruptRecordException" in letter.message


def _read_to_2(consumer: FakeConsumer) -> pl.Pipeline:
    """A pipeline that has read P0 to 2 (0 and 1 in hand), the consumer left at 4 by the
    poll that failed (it drained 2 and failed on 3)."""
    settings = load_settings(
        kafka={"input_topic": T},
        provider={"kind": "dashscope", "api_key": "x", "dimension": 64},
        http={"enabled": False},
    )
    p = pl.Pipeline(settings, consumer, NoDeadLetters(), FakeStore(), InstantEmbedder())  # type: ignore[arg-type]
    p.tracker.assign((T, 0), 0)
    for offset in (0, 1):
        p.tracker.track((T, 0), offset)
    consumer.positions[P0] = 4
    return p


async def test_a_partition_assigned_again_during_isolation_goes_back_to_its_stored_offset() -> None:
    """The pipeline had read P0 to 2 (0 and 1 in flight, 0 stored). A rebalance during the
    isolation gives P0 back at its stored offset 0; the isolation then reads 2 and skips 3.
    Nothing of it may be kept, and P0 must be read again from 0 (else 0 to 3 are lost)."""
    consumer = FakeConsumer({P0: [0, 1, 2, None, 4]})
    p = _read_to_2(consumer)

    def rebalance() -> None:
        consumer.on_poll = lambda: None
        p.tracker.revoke((T, 0))
        p.tracker.assign((T, 0), 0)
        consumer.seek(P0, 0)

    consumer.on_poll = rebalance
    fetched = await p.fetcher.isolate()
    assert (fetched.batches, list(fetched.unreadable)) == ({}, [])
    assert consumer.positions[P0] == 0


async def test_isolation_reads_on_from_where_the_pipeline_read_to() -> None:
    consumer = FakeConsumer({P0: [0, 1, 2, None, 4]})
    p = _read_to_2(consumer)
    fetched = await p.fetcher.isolate()
    assert offsets(fetched.batches) == {0: [2]}
    assert [(u.partition, u.offset) for u in fetched.unreadable] == [(0, 3)]
    assert consumer.positions[P0] == 4
