"""The stages wired together: fetch -> decode -> dedupe -> batch -> dispatch (embed) -> write
-> commit.

One task fetches, decodes and routes; up to the embed stage's concurrency ceiling of tasks
embed (``dispatch``); ``batch.writers`` tasks write (``write``), each for the partitions whose
number modulo the writers is its own; one copies stored offsets to Kafka (``commit``). What
joins them is bounded by ``max_in_flight`` (events fetched but not yet stored): past it the
consumer pauses its partitions and keeps polling (so it stays in the group) until the writers
catch up. The runner also owns what crosses stages: rebalances (epochs in the
``OffsetTracker``), backpressure, the graceful drain and readiness.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from worker.analysis.stage import AnalysisStage
from worker.config import OversizePolicy, Settings
from worker.embedding.providers.base import Embedder
from worker.embedding.stage import EmbedStage
from worker.model import Item
from worker.ops.metrics import Metrics, PipelineSnapshot
from worker.pipeline.batch import MicroBatcher
from worker.pipeline.commit import KafkaCommits
from worker.pipeline.decode import Decoder, Limits
from worker.pipeline.dedupe import Dedupe
from worker.pipeline.dispatch import Dispatcher, Letters
from worker.pipeline.dualwrite import DualWrite
from worker.pipeline.fetch import Fetcher
from worker.pipeline.offsets import TP, OffsetTracker
from worker.pipeline.stats import Stats
from worker.pipeline.write import Writer
from worker.sinks.deadletter import DeadLetterSink
from worker.sinks.store import ShuttingDown, Store

if TYPE_CHECKING:
    from worker.ops.tracing import Tracing

log = structlog.get_logger(__name__)


class Pipeline(ConsumerRebalanceListener):  # type: ignore[misc]
    STUCK_AFTER_S = 60.0
    REVOKE_GRACE_S = 5.0
    # Kafka's copy of the offsets is for lag monitoring: at most this often.
    COMMIT_EVERY_S = 0.5
    # A poll while the partitions are paused (backpressure): the resume check's interval.
    PAUSED_POLL_MS = 10

    def __init__(
        self,
        settings: Settings,
        consumer: AIOKafkaConsumer,
        dead_letters: DeadLetterSink,
        store: Store,
        embedder: Embedder,
        metrics: Metrics | None = None,
        analysis: AnalysisStage | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.dead_letters = dead_letters
        self.store = store
        self.embedder = embedder
        self.metrics = metrics or Metrics()
        self.analysis = analysis
        self.stats = Stats()
        self.limits = Limits.of(settings)
        self.tracker = OffsetTracker()
        self.fatal: BaseException | None = None
        self.running = False
        self.last_poll = time.monotonic()
        self._paused = False
        self._revoking: set[TP] = set()
        self._stop = asyncio.Event()

        self.stage = EmbedStage(
            embedder,
            settings.provider,
            on_request=self.metrics.request_seconds_observer,
            recut=settings.oversize_policy is not OversizePolicy.REJECT,
        )
        if tracing is not None:
            self.stage.on_retry = tracing.retried
        self.batcher = MicroBatcher(
            max_texts=embedder.max_texts,
            max_tokens=settings.provider.max_tokens_per_request,
            linger_s=settings.batch.linger_ms / 1000,
        )
        self.stage.on_max_texts = self._lower_batch_size
        self.fetcher = Fetcher(
            consumer, self.tracker, settings.kafka, self.limits.schemas, self._revoking
        )
        self.decoder = Decoder(self.limits, self.tracker, self._revoking, self.stats, tracing)
        self.dedupe = Dedupe(store, embedder.model, embedder.dimension, self.stats, embedder.sparse)
        self.commits = KafkaCommits(consumer, self._revoking, self.COMMIT_EVERY_S)
        # reembed.dual_write: the re-embed targets embedded and written beside the rows.
        self.dual = DualWrite(settings, store, self.stats) if settings.reembed.dual_write else None
        # Partition modulo writers picks the writer (one while the analysis runs).
        count = 1 if analysis is not None else settings.batch.writers
        self.writers = [
            Writer(
                store,
                self.tracker,
                on_stored=self.commits.offer,
                group_id=settings.kafka.group_id,
                model=embedder.model,
                dimension=embedder.dimension,
                max_rows=settings.batch.write_max_rows,
                release=self.dedupe.release,
                on_fatal=self._fail,
                stats=self.stats,
                metrics=self.metrics,
                analysis=analysis,
                tracing=tracing,
                ordered=analysis is not None,
                dual=self.dual,
            )
            for _ in range(count)
        ]
        self.dispatcher = Dispatcher(
            self.stage,
            self.tracker,
            release=self.dedupe.release,
            send_letters=self._dead_letter,
            to_writer=self._to_writers,
            on_fatal=self._fail,
            stats=self.stats,
            metrics=self.metrics,
            letter_budget=self.limits.dead_letter_bytes,
            model=embedder.model,
            tracing=tracing,
            dual=self.dual,
        )
        self.metrics.bind(self.snapshot)

    # ---- state for probes and metrics ------------------------------------------------

    def checks(self) -> dict[str, bool]:
        """What readiness is made of (reported by /readyz)."""
        return {
            "consuming": self.running,
            "polling": time.monotonic() - self.last_poll < self.STUCK_AFTER_S,
            "postgres": not self.store.down,
            "provider_credentials": self.stage.fault is None,
        } | (
            {}
            if self.limits.schemas is None
            else {"schema_registry": not self.limits.schemas.waiting}
        )

    @property
    def ready(self) -> bool:
        return all(self.checks().values())

    def lag(self) -> dict[TP, int]:
        """Records not yet durable, per assigned partition: from the end a consumer can read
        to (the last stable offset under ``read_committed``: records of open transactions
        are not readable yet; else the high-water mark), as of the last fetch."""
        out: dict[TP, int] = {}
        committed_only = self.settings.kafka.isolation_level == "read_committed"
        for tp in self.consumer.assignment():
            key = (tp.topic, tp.partition)
            high = self.consumer.highwater(tp)
            stable = self.consumer.last_stable_offset(tp) if committed_only else None
            if stable is not None and stable >= 0:
                high = stable
            first = self.tracker.first_unsettled(key)
            if high is not None and first is not None:
                out[key] = max(0, high - first)
        return out

    def snapshot(self) -> PipelineSnapshot:
        """What /metrics reads at scrape time (one source of truth: the stages' own state)."""
        stage = self.stage
        return PipelineSnapshot(
            stats=self.stats,
            analysis=self.analysis.stats if self.analysis is not None else None,
            in_flight=self.tracker.in_flight,
            paused_partitions=len(self.consumer.paused()) if self.running else 0,
            concurrency_limit=stage.concurrency.limit,
            concurrency_ceiling=stage.concurrency.ceiling,
            requests_in_flight=stage.concurrency.in_flight,
            max_texts=stage.max_texts,
            circuit_state=stage.breaker.state,
            auth_fault=stage.fault is not None,
            postgres_up=not self.store.down,
            schema_registry_up=self.limits.schemas is None or not self.limits.schemas.waiting,
            ready=self.ready,
            lag=self.lag(),
        )

    # ---- rebalance -------------------------------------------------------------------

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        """Seek every new partition to the offset stored with the vectors.

        aiokafka logs and swallows exceptions from this callback, which would leave the
        partitions unread while the worker looks healthy: any failure here stops the worker.
        """
        try:
            await self._assign(assigned)
        except Exception as exc:
            log.exception("partition assignment failed; stopping")
            self.fatal = exc

    async def _assign(self, assigned: list[TopicPartition]) -> None:
        topic = self.settings.kafka.input_topic
        stored = await self.store.load_offsets(self.settings.kafka.group_id, topic)
        for tp in assigned:
            position = stored.get(tp.partition)
            if position is not None:
                self.consumer.seek(tp, position)
            else:
                if self.settings.kafka.auto_offset_reset == "earliest":
                    await self.consumer.seek_to_beginning(tp)
                else:
                    await self.consumer.seek_to_end(tp)
                # Known from the start, so that what a failed poll lost is read again
                # (worker.kafka.unreadable).
                position = await self.consumer.position(tp)
            self.tracker.assign((tp.topic, tp.partition), position)
        if self._paused:
            self.consumer.pause(*assigned)
        log.info("partitions assigned", partitions=sorted(tp.partition for tp in assigned))

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        """Give in-flight work of revoked partitions a moment to be stored, then drop it.

        Dropped work is never stored with its offsets (epochs fence it), so the next owner
        redoes it; offsets in Postgres never move backwards (see
        worker.sinks.postgres.UPSERT_AND_STORE_OFFSETS).
        """
        tps = {(tp.topic, tp.partition) for tp in revoked}
        self._revoking |= tps
        deadline = time.monotonic() + self.REVOKE_GRACE_S
        while time.monotonic() < deadline and any(self.tracker.pending(tp) for tp in tps):
            self._flush_batcher()
            await asyncio.sleep(0.05)
        for tp in tps:
            self.tracker.revoke(tp)
            self.commits.forget(tp)
        self._revoking -= tps
        log.info("partitions revoked", partitions=sorted(p for _, p in tps))

    # ---- main loop -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        writers = [
            asyncio.create_task(w.loop(), name=f"writer-{i}") for i, w in enumerate(self.writers)
        ]
        committer = asyncio.create_task(self.commits.loop(), name="kafka-commits")
        # reembed.dual_write: the targets looked for now and then.
        refresher = [] if self.dual is None else [asyncio.create_task(self.dual.loop())]
        self.running = True
        try:
            while not stop.is_set() and self.fatal is None:
                self.last_poll = time.monotonic()
                self._backpressure()
                await self._ingest()
                for batch in self.batcher.due(time.monotonic()):
                    self.dispatcher.submit(batch)
            await self._drain()
            committer.cancel()
            await asyncio.gather(committer, return_exceptions=True)
            await self.commits.commit()
        except ShuttingDown as exc:
            log.warning(
                "stopping while postgres is unreachable; unstored events will be redone",
                during=str(exc),
            )
        finally:
            self.running = False
            for task in (*writers, *refresher, committer):
                task.cancel()
            await asyncio.gather(*writers, *refresher, committer, return_exceptions=True)
            await self.dispatcher.cancel()
            if self.dual is not None:
                await self.dual.close()
        if self.fatal is not None:
            raise self.fatal

    async def _ingest(self) -> None:
        """One fetch through decode and dedupe, into the batcher and the writer."""
        fetched = await self.fetcher.fetch(self._poll_timeout_ms(), self._stop)
        if fetched is None:
            return  # stopping: nothing of this fetch was tracked, it is read again
        decoded = self.decoder.fetch(fetched)
        settled = [*decoded.settled, *await self.fetcher.markers()]
        await self._dead_letter(decoded.letters)
        self._to_writers(settled)
        direct, embed = await self.dedupe.route(decoded.changes)
        self._to_writers(direct)
        now = time.monotonic()
        for change in embed:
            for text in change.embeddables():  # a chunked document: each chunk
                for batch in self.batcher.add(text, now):
                    self.dispatcher.submit(batch)

    async def _drain(self, timeout_s: float = 30.0) -> None:
        """Graceful stop: embed and store what was fetched, within a bounded time.

        While the provider refuses the key nothing left can be embedded: once what is
        embedded is stored, waiting out the timeout would only delay the exit.
        """
        if self.fatal is not None:
            return
        self._flush_batcher()
        deadline = time.monotonic() + timeout_s
        while (self.tracker.in_flight or self._writing()) and self.fatal is None:
            if time.monotonic() > deadline:
                break
            if self.stage.fault is not None and not any(w.busy for w in self.writers):
                break
            await asyncio.sleep(0.02)
        if self.tracker.in_flight:
            log.warning(
                "stopping with unstored events; they will be redone after restart",
                events=self.tracker.in_flight,
                provider_refuses_key=self.stage.fault is not None,
            )

    def _poll_timeout_ms(self) -> int:
        """Until the batcher's next deadline, at most 200 ms; while paused, 10 ms: the fetch
        brings nothing then, and the resume check follows it, so a longer wait idled the
        provider once the writers had drained (pauses of exactly 0.2, 0.4 s measured in
        benchmark scenario 1, most of them with the pipeline empty before the check)."""
        longest = self.PAUSED_POLL_MS if self._paused else 200
        deadline = self.batcher.next_deadline()
        if deadline is None:
            return longest
        return max(0, min(longest, int((deadline - time.monotonic()) * 1000)))

    def _backpressure(self) -> None:
        in_flight = self.tracker.in_flight
        limit = self.settings.batch.max_in_flight
        assignment = list(self.consumer.assignment())
        if not self._paused and in_flight >= limit:
            self.consumer.pause(*assignment)
            self._paused = True
            log.info("pipeline full, partitions paused", in_flight=in_flight)
        elif self._paused and in_flight <= limit // 2:
            self.consumer.resume(*assignment)
            self._paused = False
            log.info("pipeline drained, partitions resumed", in_flight=in_flight)

    def _flush_batcher(self) -> None:
        for batch in self.batcher.drain():
            self.dispatcher.submit(batch)

    def _lower_batch_size(self, max_texts: int) -> None:
        self.batcher.max_texts = max_texts

    async def _dead_letter(self, letters: Letters) -> None:
        if letters:
            await self.dead_letters.send(letters)
            for _, letter in letters:
                self.stats.dead_lettered[letter.reason.value] += 1

    def _to_writers(self, items: Sequence[Item]) -> None:
        """Each item to the writer of its partition, in the order received."""
        if len(self.writers) == 1:
            self.writers[0].enqueue(list(items))
            return
        shares: list[list[Item]] = [[] for _ in self.writers]
        for item in items:
            shares[item.partition % len(shares)].append(item)
        for writer, share in zip(self.writers, shares, strict=True):
            writer.enqueue(share)

    def _writing(self) -> bool:
        return any(w.writing for w in self.writers)

    def _fail(self, exc: BaseException) -> None:
        self.fatal = exc
