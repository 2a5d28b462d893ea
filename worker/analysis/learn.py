"""Learning from the moderation loop: consume decisions, store them as examples, rebuild.

A consumer of its own (group ``<kafka.group_id>.decisions``) reads ``analysis.decisions_topic``
one fetch at a time: its decisions are parsed and checked (``worker.analysis.decisions``),
the bad ones dead-lettered (acknowledged first), and the examples and the fetch's offsets
stored by one Postgres statement. On assignment each partition is sought to the offset stored
there, so a crash between the read and the commit reads the decisions again and a crash
after it never applies them twice. It is apart from the pipeline's consumer because
decisions need no embedding (the stored vector is reused) and are few: one sequential loop,
no batching, and a rebalance of one group never stalls the other.

Each replica keeps its label sets in memory; a transaction that changes a namespace's
decisions raises its version in ``decision_state``. A refresher compares those versions with
what it loaded, every ``decisions_refresh_s`` and right after this replica stores decisions,
and rebuilds a changed namespace's label set in a thread (``labels.label_set`` may fit a
model), at most once a second, then swaps it in between two of the writer's batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from worker import store
from worker.analysis import decisions
from worker.analysis.decisions import Decided, Example, Stored
from worker.analysis.labels import Embed, LabelError, label_set
from worker.analysis.stage import AnalysisStage, RunPg
from worker.config import Settings
from worker.deadletter import DeadLetterSink
from worker.decode import Record
from worker.envelope import dead_letter, envelope_budget
from worker.events import DeadLetter, Reason
from worker.unreadable import UNREADABLE_ERRORS, isolate

log = structlog.get_logger(__name__)

Letters = list[tuple[bytes | None, DeadLetter]]


def group_of(settings: Settings) -> str:
    return f"{settings.kafka.group_id}.decisions"


@dataclass
class LearnStats:
    consumed: int = 0
    applied: int = 0  # decision rows inserted or replaced
    dead_lettered: Counter[str] = field(default_factory=Counter)
    rebuilds: int = 0


class Learner(ConsumerRebalanceListener):  # type: ignore[misc]
    STUCK_AFTER_S = 60.0
    REBUILD_GAP_S = 1.0

    def __init__(
        self,
        settings: Settings,
        consumer: AIOKafkaConsumer,
        dead_letters: DeadLetterSink,
        pg: RunPg,
        stage: AnalysisStage,
        embed: Embed,
    ) -> None:
        assert settings.analysis.decisions_topic is not None
        self.settings = settings
        self.topic = settings.analysis.decisions_topic
        self.group = group_of(settings)
        self.consumer = consumer
        self.dead_letters = dead_letters
        self.pg = pg
        self.stage = stage
        self.embed = embed
        self.budget = envelope_budget(settings.kafka.dlq_max_message_bytes)
        self.stats = LearnStats()
        self.running = False
        self.last_poll = time.monotonic()
        self.fatal: BaseException | None = None
        # Bumped by every assignment: a fetch from before one is dropped (its partitions
        # were sought back to their stored offsets and are read again).
        self._generation = 0
        self._read_to: dict[TopicPartition, int] = {}
        self._wake = asyncio.Event()

    def checks(self) -> dict[str, bool]:
        return {
            "decisions_consuming": self.running,
            "decisions_polling": time.monotonic() - self.last_poll < self.STUCK_AFTER_S,
        }

    # ---- rebalance -------------------------------------------------------------------

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        try:
            await self._assign(assigned)
        except Exception as exc:  # aiokafka would swallow it and leave the partitions unread
            log.exception("decisions partition assignment failed; stopping")
            self.fatal = exc

    async def _assign(self, assigned: list[TopicPartition]) -> None:
        self._generation += 1
        stored = await self.pg(
            "load decision offsets", lambda c: store.load_offsets(c, self.group, self.topic)
        )
        for tp in assigned:
            position = stored.get(tp.partition)
            if position is not None:
                self.consumer.seek(tp, position)
            elif self.settings.kafka.auto_offset_reset == "earliest":
                await self.consumer.seek_to_beginning(tp)
            else:
                await self.consumer.seek_to_end(tp)
            self._read_to[tp] = await self.consumer.position(tp)
        log.info("decisions partitions assigned", partitions=sorted(t.partition for t in assigned))

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self._generation += 1
        for tp in revoked:
            self._read_to.pop(tp, None)

    # ---- the loop --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        refresher = asyncio.create_task(self._refresh_loop(), name="label-refresher")
        self.running = True
        try:
            while not stop.is_set() and self.fatal is None:
                self.last_poll = time.monotonic()
                generation = self._generation
                fetched, unreadable = await self._poll()
                records = [
                    Record.of(tp.topic, tp.partition, m)
                    for tp in sorted(fetched, key=_order)
                    for m in fetched[tp]
                ]
                if generation != self._generation:
                    self._rewind()  # assigned again during the poll: keep nothing of it
                elif records or unreadable:
                    await self.handle(records, unreadable, generation)
        finally:
            self.running = False
            refresher.cancel()
            await asyncio.gather(refresher, return_exceptions=True)
        if self.fatal is not None:
            raise self.fatal

    async def _poll(self) -> tuple[dict[TopicPartition, list[object]], list[DeadLetter]]:
        try:
            fetched = await self.consumer.getmany(
                timeout_ms=200, max_records=self.settings.kafka.max_poll_records
            )
            return fetched, []
        except UNREADABLE_ERRORS as exc:
            log.warning("a fetched decision cannot be parsed; isolating it", error=repr(exc))
            found, bad = await isolate(
                self.consumer, dict(self._read_to), self.settings.kafka.max_poll_records
            )
            return found, [u.letter() for u in bad]

    async def handle(
        self, records: list[Record], unreadable: list[DeadLetter], generation: int
    ) -> None:
        """One fetch: dead-letter what cannot be learned, store the rest with the offsets."""
        s = self.settings
        letters: Letters = [(None, u) for u in unreadable]
        decided: list[Decided] = []
        for record in records:
            out = decisions.parse(record, s.default_namespace, self.stage.namespaces, self.budget)
            if isinstance(out, DeadLetter):
                letters.append((record.key, out))
            else:
                decided.append(out)
        found = await self._lookup(decided)
        examples: list[Example] = []
        for d in decided:
            built = decisions.build(d, found.get(d.key), self.stage.model, self.budget)
            if isinstance(built, DeadLetter):
                letters.append((d.record.key, built))
            else:
                examples.append(built)
        examples = await self._embed_missing(examples, letters)
        if letters:
            letters.sort(key=lambda kl: (kl[1].source.partition, kl[1].source.offset))
            await self.dead_letters.send(letters)
            for _, letter in letters:
                self.stats.dead_lettered[letter.reason.value] += 1
        offsets: dict[tuple[str, int], int] = {}
        for record in records:
            offsets[(record.topic, record.partition)] = record.offset + 1
        for u in unreadable:
            tp = (u.source.topic, u.source.partition)
            offsets[tp] = max(offsets.get(tp, 0), u.source.offset + 1)
        if generation != self._generation:
            self._rewind()  # assigned again meanwhile: read again from the stored offsets
            return
        model = self.stage.model
        changed = await self.pg(
            "store decisions",
            partial(
                decisions.apply,
                examples=examples,
                model=model,
                group_id=self.group,
                offsets=offsets,
            ),
        )
        for (topic, partition), offset in offsets.items():
            tp = TopicPartition(topic, partition)
            if tp in self._read_to:  # still ours
                self._read_to[tp] = max(offset, self._read_to[tp])
        self.stats.consumed += len(records) + len(unreadable)
        self.stats.applied += changed
        if changed:
            log.info("decisions stored", changed=changed, dead_lettered=len(letters))
            self._wake.set()

    def _rewind(self) -> None:
        """Back to the offsets stored last (what was read since is read again)."""
        for tp, offset in self._read_to.items():
            if tp in self.consumer.assignment():
                self.consumer.seek(tp, offset)

    async def _lookup(self, decided: list[Decided]) -> dict[tuple[str, str], Stored]:
        """The decided events' rows; an id not stored yet is looked up again until its
        decision is ``decisions_grace_s`` old (a result is published before its row commits)."""
        keys = [d.key for d in decided]
        found = await self.pg("decided rows", partial(decisions.lookup, keys=keys))
        grace_ms = self.settings.analysis.decisions_grace_s * 1000
        now_ms = time.time() * 1000
        young = [
            d.record.timestamp_ms
            for d in decided
            if d.key not in found and d.record.timestamp_ms is not None
        ]
        wait_ms = max((t + grace_ms - now_ms for t in young), default=0.0)
        if wait_ms > 0:
            await asyncio.sleep(min(wait_ms, grace_ms) / 1000)
            missing = [k for k in keys if k not in found]
            found |= await self.pg("decided rows", partial(decisions.lookup, keys=missing))
        return found

    async def _embed_missing(self, examples: list[Example], letters: Letters) -> list[Example]:
        """Rows embedded by another model: their text is embedded again, by type."""
        out = [e for e in examples if e.vector is not None]
        for text_type in {e.text_type for e in examples if e.vector is None}:
            batch = [e for e in examples if e.vector is None and e.text_type is text_type]
            try:
                vectors = await self.embed([e.content for e in batch], text_type)
            except LabelError as exc:
                for e in batch:
                    letter = dead_letter(
                        e.decided.record,
                        Reason.PROVIDER_REJECTED,
                        str(exc),
                        namespace=e.decided.namespace,
                        id=e.decided.id,
                        budget=self.budget,
                    )
                    letters.append((e.decided.record.key, letter))
                continue
            for e, v in zip(batch, vectors, strict=True):
                e.vector = v
                out.append(e)
        return out

    # ---- label sets ------------------------------------------------------------------

    async def _refresh_loop(self) -> None:
        interval = self.settings.analysis.decisions_refresh_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                if await self.refresh():
                    await asyncio.sleep(self.REBUILD_GAP_S)
            except Exception:  # a failed rebuild keeps the label set it had; tried again
                log.exception("label set rebuild failed; keeping the current one")

    async def refresh(self) -> bool:
        """Rebuild the label sets whose decisions changed since they were loaded."""
        model = self.stage.model
        current = await self.pg("decision versions", partial(decisions.versions, model=model))
        rebuilt = False
        for namespace, version in sorted(current.items()):
            ns = self.stage.namespaces.get(namespace)
            if ns is None or ns.classify is None:
                continue
            if self.stage.decision_versions.get(namespace) == version:
                continue
            rows = await self.pg(
                "label rows", partial(decisions.label_rows, namespace=namespace, model=model)
            )
            labels = await asyncio.to_thread(label_set, namespace, ns.classify, rows)
            self.stage.labels[namespace] = labels
            self.stage.decision_versions[namespace] = version
            self.stats.rebuilds += 1
            rebuilt = True
            log.info(
                "label set rebuilt with decisions",
                namespace=namespace,
                version=version,
                examples=labels.examples,
            )
        return rebuilt


def _order(tp: TopicPartition) -> tuple[str, int]:
    return (tp.topic, tp.partition)
