"""Learning from the moderation loop: consume decisions, store them as examples, rebuild.

A consumer of its own (``worker.side.consumer``, group ``<kafka.group_id>.decisions``) reads
``analysis.decisions_topic`` one fetch at a time: its decisions are parsed and checked
(``worker.analysis.decisions``), the bad ones dead-lettered (acknowledged first), and the
examples and the fetch's offsets stored by one Postgres statement, exactly once. It is apart
from the pipeline's consumer because decisions need no embedding (the stored vector is
reused) and are few: one sequential loop, no batching, and a rebalance of one group never
stalls the other.

Each replica keeps its label sets in memory; a transaction that changes a namespace's
decisions raises its version in ``decision_state``. A refresher compares those versions with
what it loaded, every ``decisions_refresh_s`` and right after this replica stores decisions,
and rebuilds a changed namespace's label set in a thread (``labels.label_set`` may fit a
model), at most once a second, then swaps it in between two of the writer's batches.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from functools import partial

import structlog
from aiokafka import AIOKafkaConsumer

from worker.analysis import decisions
from worker.analysis.decisions import Change, Decided, Example, Stored
from worker.analysis.labels import Embed, LabelError, label_set
from worker.analysis.stage import AnalysisStage
from worker.config import Settings
from worker.envelope import dead_letter
from worker.events import DeadLetter, Reason
from worker.model import Record
from worker.side.consumer import ConsumerStats, Letters, SideConsumer
from worker.sinks.deadletter import DeadLetterSink
from worker.sinks.store import RunPg

log = structlog.get_logger(__name__)


def group_of(settings: Settings) -> str:
    return f"{settings.kafka.group_id}.decisions"


@dataclass
class LearnStats(ConsumerStats):
    rebuilds: int = 0


class Learner(SideConsumer):
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
        self.stats: LearnStats = LearnStats()
        topic = settings.analysis.decisions_topic
        super().__init__("decisions", settings, consumer, dead_letters, pg, topic, self.stats)
        self.stage = stage
        self.embed = embed
        self._wake = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        refresher = asyncio.create_task(self._refresh_loop(), name="label-refresher")
        try:
            await super().run(stop)
        finally:
            refresher.cancel()
            await asyncio.gather(refresher, return_exceptions=True)

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
        found = await self._lookup([d for d in decided if d.label is not None])
        examples: list[Example] = []
        for d in decided:
            if d.label is None:
                continue  # a withdrawal needs no row
            built = decisions.build(d, found.get(d.key), self.stage.model, self.budget)
            if isinstance(built, DeadLetter):
                letters.append((d.record.key, built))
            else:
                examples.append(built)
        ready = {id(e.decided): e for e in await self._embed_missing(examples, letters)}
        # In the order read, withdrawals among the examples: an id's last change wins.
        changes: list[Change] = [
            d if d.label is None else ready[id(d)]
            for d in decided
            if d.label is None or id(d) in ready
        ]
        await self.send_letters(letters)
        offsets = self.offsets_after(records, unreadable)
        if self.stale(generation):
            return  # assigned again meanwhile: read again from the stored offsets
        model = self.stage.model
        changed = await self.pg(
            "store decisions",
            partial(
                decisions.apply,
                changes=changes,
                model=model,
                group_id=self.group,
                offsets=offsets,
            ),
        )
        self.stored(offsets, len(records) + len(unreadable), changed)
        if changed:
            log.info("decisions stored", changed=changed, dead_lettered=len(letters))
            self._wake.set()

    async def _lookup(self, decided: list[Decided]) -> dict[tuple[str, str], Stored]:
        """The decided events' rows, waiting out ``decisions_grace_s`` for young ones."""
        wanted = [(d.key, d.record.timestamp_ms) for d in decided]
        grace_s = self.settings.analysis.decisions_grace_s
        return await self.lookup_with_grace("decided rows", decisions.lookup, wanted, grace_s)

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
