"""The worker's stages wired together: fetch -> decode -> skip unchanged -> batch -> embed -> write.

One task fetches and decodes, up to the concurrency ceiling of tasks embed, one task writes. The
only hand-offs are bounded by ``max_in_flight`` (events fetched but not yet stored): past
it the consumer pauses its partitions and keeps polling (so it stays in the group) until
the writer catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from worker import backoff
from worker.analysis.labels import stage_embedder
from worker.analysis.stage import AnalysisStage
from worker.config import Settings
from worker.embedding.providers.base import ConfigurationFault, Embedder
from worker.embedding.stage import EmbedStage
from worker.envelope import dead_letter
from worker.events import DeadLetter, Reason
from worker.model import NO_TIME, Change, Item, Record, Settled
from worker.ops.metrics import Metrics
from worker.pipeline.batch import MicroBatcher
from worker.pipeline.decode import Limits, decode
from worker.pipeline.formats import Ignored
from worker.pipeline.offsets import TP, OffsetTracker
from worker.pipeline.registry import Schemas
from worker.pipeline.unreadable import UNREADABLE_ERRORS, Unreadable, isolate
from worker.sinks import postgres as store
from worker.sinks.deadletter import DeadLetterSink

if TYPE_CHECKING:
    from worker.ops.tracing import Tracing

log = structlog.get_logger(__name__)
T = TypeVar("T")


class ShuttingDown(Exception):
    """Postgres is unreachable and a stop was requested: give up waiting, store nothing."""


@dataclass
class Stats:
    consumed: int = 0
    stored: int = 0  # rows inserted or re-embedded
    deleted: int = 0  # delete events applied
    unchanged: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    texts_embedded: int = 0
    tokens_estimated: int = 0
    requests: int = 0
    retries: int = 0
    retries_by_cause: Counter[str] = field(default_factory=Counter)
    throttled: int = 0
    transactions: int = 0


class Pipeline(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(
        self,
        settings: Settings,
        consumer: AIOKafkaConsumer,
        dead_letters: DeadLetterSink,
        pool: asyncpg.Pool,
        embedder: Embedder,
        metrics: Metrics | None = None,
        analysis: AnalysisStage | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.tracing = tracing
        self.analysis = analysis
        self.consumer = consumer
        self.dead_letters = dead_letters
        self.pool = pool
        self.embedder = embedder
        self.metrics = metrics or Metrics()
        self.stage = EmbedStage(
            embedder, settings.provider, on_request=self.metrics.request_seconds_observer
        )
        self.tracker = OffsetTracker()
        self.stats = Stats()
        self.limits = Limits.of(settings)
        self.batcher = MicroBatcher(
            max_texts=embedder.max_texts,
            max_tokens=settings.provider.max_tokens_per_request,
            linger_s=settings.batch.linger_ms / 1000,
        )
        self.stage.on_max_texts = self._lower_batch_size
        if tracing is not None:
            self.stage.on_retry = tracing.retried
        self._keys_in_flight: Counter[tuple[str, str]] = Counter()
        self._queued: list[list[Change]] = []
        self._embedding = 0
        self._ready: list[Item] = []
        self._has_work = asyncio.Event()
        self._to_commit: dict[TP, int] = {}
        self._commit_due = asyncio.Event()
        self._paused = False
        self._revoking: set[TP] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.fatal: BaseException | None = None
        self.running = False
        self.postgres_down = False
        self.last_poll = time.monotonic()
        self._stop = asyncio.Event()
        self._writing = False
        self.metrics.bind(self)

    STUCK_AFTER_S = 60.0
    REVOKE_GRACE_S = 5.0
    # Kafka's copy of the offsets is for lag monitoring: at most this often.
    COMMIT_EVERY_S = 0.5

    def checks(self) -> dict[str, bool]:
        """What readiness is made of (reported by /readyz)."""
        return {
            "consuming": self.running,
            "polling": time.monotonic() - self.last_poll < self.STUCK_AFTER_S,
            "postgres": not self.postgres_down,
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
        group = self.settings.kafka.group_id
        stored = await self._pg("load offsets", lambda c: store.load_offsets(c, group, topic))
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
                # (worker.pipeline.unreadable).
                position = await self.consumer.position(tp)
            self.tracker.assign((tp.topic, tp.partition), position)
        if self._paused:
            self.consumer.pause(*assigned)
        log.info("partitions assigned", partitions=sorted(tp.partition for tp in assigned))

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        """Give in-flight work of revoked partitions a moment to be stored, then drop it.

        Dropped work is never stored with its offsets (epochs fence it), so the next owner
        redoes it; offsets in Postgres never move backwards (see store.UPSERT_AND_STORE_OFFSETS).
        """
        tps = {(tp.topic, tp.partition) for tp in revoked}
        self._revoking |= tps
        deadline = time.monotonic() + self.REVOKE_GRACE_S
        while time.monotonic() < deadline and any(self.tracker.pending(tp) for tp in tps):
            self._flush_batcher()
            await asyncio.sleep(0.05)
        for tp in tps:
            self.tracker.revoke(tp)
            self._to_commit.pop(tp, None)
        self._revoking -= tps
        log.info("partitions revoked", partitions=sorted(p for _, p in tps))

    async def prepare(self) -> None:
        """Before consuming: embed and store the label sets the analysis file names."""
        if self.analysis is not None:
            embed = stage_embedder(
                self.stage, self.embedder.max_texts, self.settings.provider.max_tokens_per_text
            )
            await self.analysis.prepare(self._pg, embed)

    # ---- main loop -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        writer = asyncio.create_task(self._write_loop(), name="writer")
        committer = asyncio.create_task(self._commit_loop(), name="kafka-commits")
        self.running = True
        try:
            while not stop.is_set() and self.fatal is None:
                self.last_poll = time.monotonic()
                self._backpressure()
                await self._ingest(*await self._poll())
                for batch in self.batcher.due(time.monotonic()):
                    self._submit(batch)
            await self._drain()
            committer.cancel()
            await asyncio.gather(committer, return_exceptions=True)
            await self._commit_to_kafka()
        except ShuttingDown as exc:
            log.warning(
                "stopping while postgres is unreachable; unstored events will be redone",
                during=str(exc),
            )
        finally:
            self.running = False
            writer.cancel()
            committer.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(writer, committer, *self._tasks, return_exceptions=True)
        if self.fatal is not None:
            raise self.fatal

    async def _drain(self, timeout_s: float = 30.0) -> None:
        """Graceful stop: embed and store what was fetched, within a bounded time.

        While the provider refuses the key nothing left can be embedded: once what is
        embedded is stored, waiting out the timeout would only delay the exit.
        """
        if self.fatal is not None:
            return
        self._flush_batcher()
        deadline = time.monotonic() + timeout_s
        while (self.tracker.in_flight or self._writing) and self.fatal is None:
            if time.monotonic() > deadline:
                break
            if self.stage.fault is not None and not (self._writing or self._ready):
                break
            await asyncio.sleep(0.02)
        if self.tracker.in_flight:
            log.warning(
                "stopping with unstored events; they will be redone after restart",
                events=self.tracker.in_flight,
                provider_refuses_key=self.stage.fault is not None,
            )

    def _poll_timeout_ms(self) -> int:
        deadline = self.batcher.next_deadline()
        if deadline is None:
            return 200
        return max(0, min(200, int((deadline - time.monotonic()) * 1000)))

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

    # ---- fetch, decode, skip unchanged -------------------------------------------------

    async def _poll(self) -> tuple[dict[TopicPartition, list[object]], list[Unreadable]]:
        """One fetch; a record the client cannot parse is isolated (``pipeline.unreadable``)."""
        try:
            batches = await self.consumer.getmany(
                timeout_ms=self._poll_timeout_ms(),
                max_records=self.settings.kafka.max_poll_records,
            )
        except UNREADABLE_ERRORS as exc:
            log.warning("a fetched record cannot be parsed; isolating it", error=repr(exc))
            return await self._isolate()
        return batches, []

    async def _isolate(self) -> tuple[dict[TopicPartition, list[object]], list[Unreadable]]:
        """``isolate`` from where each partition was read to. A partition assigned again
        meanwhile (a rebalance) keeps nothing of it and goes back to its new start."""
        tps = {(tp.topic, tp.partition): tp for tp in self.consumer.assignment()}
        before = {key: self.tracker.epoch(key) for key in tps}
        read_to = {
            tp: offset
            for key, tp in tps.items()
            if (offset := self.tracker.read_to(key)) is not None
        }
        fetched, found = await isolate(self.consumer, read_to, self.settings.kafka.max_poll_records)
        moved = {key for key, epoch in before.items() if self.tracker.epoch(key) != epoch}
        for key in moved:
            start = self.tracker.read_to(key)
            if start is not None and tps[key] in self.consumer.assignment():
                self.consumer.seek(tps[key], start)
        return (
            {tp: rs for tp, rs in fetched.items() if (tp.topic, tp.partition) not in moved},
            [u for u in found if (u.topic, u.partition) not in moved],
        )

    async def _ingest(
        self, batches: dict[TopicPartition, list[object]], unreadable: Sequence[Unreadable] = ()
    ) -> None:
        """Decode one fetch, every partition of it, then route it with one hash lookup.

        Every partition is decoded and tracked under its current epoch before the first
        await, so a rebalance that completes during the lookup (or the dead letters) is
        seen by the epochs: the stale changes are dropped downstream and redone.
        """
        changes: list[Change] = []
        letters: list[tuple[bytes | None, DeadLetter]] = []
        settled: list[Item] = []
        if self.limits.schemas is not None:
            kept = await self._with_schemas(self.limits.schemas, batches, unreadable)
            if kept is None:
                return  # stopping: nothing of this fetch was tracked, it is read again
            batches, unreadable = kept
        for tp, messages in batches.items():
            self._decode(tp, messages, changes, letters, settled)
        for record in unreadable:  # tracked after the records read before it
            self._unreadable(record, letters, settled)
        await self._skipped(settled)
        await self._dead_letter(letters)
        self._enqueue(settled)
        await self._route(changes)

    async def _with_schemas(
        self,
        schemas: Schemas,
        batches: dict[TopicPartition, list[object]],
        unreadable: Sequence[Unreadable],
    ) -> tuple[dict[TopicPartition, list[object]], Sequence[Unreadable]] | None:
        """Fetch the schemas a fetch names before it is decoded (decoding reads memory),
        waiting out a registry that cannot give them: nothing of the fetch is tracked
        meanwhile, so nothing moves. A partition assigned again meanwhile keeps nothing of
        the fetch (its new start is read again); None on a stop: nothing is kept."""
        keys = {(tp.topic, tp.partition) for tp in batches} | {
            (u.topic, u.partition) for u in unreadable
        }
        epochs = {key: self.tracker.epoch(key) for key in keys}
        values = [getattr(m, "value", None) for ms in batches.values() for m in ms]
        if not await schemas.prefetch(values, self._stop):
            return None
        moved = {key for key in keys if self.tracker.epoch(key) != epochs[key]}
        return (
            {tp: ms for tp, ms in batches.items() if (tp.topic, tp.partition) not in moved},
            [u for u in unreadable if (u.topic, u.partition) not in moved],
        )

    def _decode(
        self,
        tp: TopicPartition,
        messages: list[object],
        changes: list[Change],
        letters: list[tuple[bytes | None, DeadLetter]],
        settled: list[Item],
    ) -> None:
        key = (tp.topic, tp.partition)
        epoch = self.tracker.epoch(key)
        if epoch is None or key in self._revoking:
            return  # not (or no longer) ours; whoever owns it now reads it again
        tracing = self.tracing
        for msg in messages:
            record = Record.of(tp.topic, tp.partition, msg)
            if not self.tracker.track(key, record.offset):
                continue  # delivered again after a seek; already in hand
            self.stats.consumed += 1
            result = decode(record, self.limits)
            if isinstance(result, DeadLetter):
                letters.append((record.key, result))
                settled.append(Settled(tp.topic, tp.partition, record.offset, epoch))
            elif isinstance(result, Ignored):
                settled.append(Settled(tp.topic, tp.partition, record.offset, epoch))
            else:
                result.epoch = epoch
                changes.append(result)
            if tracing is not None and not isinstance(result, Ignored):
                span = tracing.received(tp.topic, tp.partition, record.offset, record.headers)
                if isinstance(result, DeadLetter):
                    result._trace = span
                else:
                    result.trace = span

    async def _skipped(self, settled: list[Item]) -> None:
        """Offsets that hold no record for this worker: transaction markers, and records of
        aborted transactions under ``read_committed``. The consumer's position moves past
        them without a record; they are settled like one, so the offset stored in Postgres
        (and the lag) reaches the end of the partition instead of stopping at a marker."""
        for tp in self.consumer.assignment():
            key = (tp.topic, tp.partition)
            epoch, read_to = self.tracker.epoch(key), self.tracker.read_to(key)
            if epoch is None or read_to is None or key in self._revoking:
                continue
            try:
                position = await self.consumer.position(tp)
            except KafkaError:  # no longer assigned (IllegalStateError)
                continue
            if position <= read_to or self.tracker.epoch(key) != epoch:
                continue
            if self.tracker.track(key, position - 1):
                settled.append(Settled(tp.topic, tp.partition, position - 1, epoch))

    def _unreadable(
        self,
        record: Unreadable,
        letters: list[tuple[bytes | None, DeadLetter]],
        settled: list[Item],
    ) -> None:
        key = (record.topic, record.partition)
        epoch = self.tracker.epoch(key)
        if epoch is None or key in self._revoking or not self.tracker.track(key, record.offset):
            return
        self.stats.consumed += 1
        letters.append((None, record.letter()))
        settled.append(Settled(record.topic, record.partition, record.offset, epoch))

    async def _route(self, changes: list[Change]) -> None:
        """Deletes go straight to the writer; upserts skip the API when nothing changed."""
        lookup: list[Change] = []
        for change in changes:
            # Only trust the stored hash when no earlier event for this key is in flight.
            if change.op == "upsert" and not self._keys_in_flight[change.key]:
                lookup.append(change)
            self._keys_in_flight[change.key] += 1
        known: dict[tuple[str, str], bytes] = {}
        if lookup:
            keys = [c.key for c in lookup]
            model, dim = self.embedder.model, self.embedder.dimension
            known = await self._pg(
                "hash lookup", lambda c: store.stored_hashes(c, keys, model, dim)
            )
        trusted = {id(c) for c in lookup}
        now = time.monotonic()
        for change in changes:
            if change.op == "delete":
                self._enqueue([change])
            elif id(change) in trusted and known.get(change.key) == change.content_hash:
                change.unchanged = True
                self.stats.unchanged += 1
                self._enqueue([change])
            else:
                for batch in self.batcher.add(change, now):
                    self._submit(batch)

    # ---- embed -------------------------------------------------------------------------

    def _flush_batcher(self) -> None:
        for batch in self.batcher.drain():
            self._submit(batch)

    def _lower_batch_size(self, max_texts: int) -> None:
        self.batcher.max_texts = max_texts

    def _submit(self, batch: list[Change]) -> None:
        self._queued.append(batch)
        self._dispatch()

    def _dispatch(self) -> None:
        while self._queued and self._embedding < self.stage.concurrency.maximum:
            queued = self._queued.pop(0)
            batch = [c for c in queued if self.tracker.is_current(c)]
            self._release([c for c in queued if not self.tracker.is_current(c)])
            if not batch:
                continue
            self._embedding += 1
            task = asyncio.create_task(self._embed(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _embed(self, batch: list[Change]) -> None:
        try:
            await self._embed_batch(batch)
        except Exception as exc:
            log.exception("embedding stage failed; stopping")
            self.fatal = exc

    async def _embed_batch(self, batch: list[Change]) -> None:
        tracing = self.tracing
        span: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if tracing is not None:
            span = tracing.embedding([c.trace for c in batch], self.embedder.model)
        try:
            with span:
                outcome = await self.stage.run(batch)
        except ConfigurationFault as exc:
            log.error("provider configuration fault; stopping", error=exc.message, code=exc.code)
            self.fatal = exc
            return
        finally:
            self._embedding -= 1
            self._dispatch()
        self.stats.batches += 1
        self.stats.tokens_estimated += sum(c.tokens for c in batch)
        self.metrics.batch_size.observe(len(batch))
        self.stats.requests += outcome.requests
        self.stats.retries += outcome.retries
        self.stats.retries_by_cause.update(outcome.retries_by_cause)
        self.stats.throttled += outcome.throttled
        self.stats.texts_embedded += len(outcome.embedded)
        letters: list[tuple[bytes | None, DeadLetter]] = []
        settled: list[Item] = []
        for change, error in outcome.refused:
            letter = dead_letter(
                change.record,
                Reason.PROVIDER_REJECTED,
                error.message,
                error.code,
                namespace=change.namespace,
                id=change.id,
                budget=self.limits.dead_letter_bytes,
            )
            letter._trace = change.trace
            letters.append((change.record.key, letter))
            settled.append(Settled(change.topic, change.partition, change.offset, change.epoch))
            self._release([change])
        await self._dead_letter(letters)
        self._enqueue([*outcome.embedded, *settled])

    async def _dead_letter(self, letters: list[tuple[bytes | None, DeadLetter]]) -> None:
        if letters:
            await self.dead_letters.send(letters)
            for _, letter in letters:
                self.stats.dead_lettered[letter.reason.value] += 1

    # ---- write -------------------------------------------------------------------------

    def _enqueue(self, items: list[Item]) -> None:
        if items:
            self._ready.extend(items)
            self._has_work.set()

    async def _write_loop(self) -> None:
        """Write what is ready at once; what arrives meanwhile waits for the next transaction.

        Natural batching: an idle writer adds no wait (a fixed linger was most of an event's
        latency at moderate rates), and under load transactions grow by themselves, up to
        ``write_max_rows``, while the one before them runs.
        """
        while True:
            await self._has_work.wait()
            self._has_work.clear()
            self._writing = True
            try:
                while self._ready:
                    await self._write_once()
            except ShuttingDown:
                return
            except Exception as exc:
                log.exception("postgres write failed; stopping")
                self.fatal = exc
                return
            finally:
                self._writing = False

    async def _write_once(self) -> None:
        limit = self.settings.batch.write_max_rows
        items, self._ready = self._ready[:limit], self._ready[limit:]
        current = [i for i in items if self.tracker.is_current(i)]
        self._release([i for i in items if not self.tracker.is_current(i)])
        if not current:
            return
        offsets = self.tracker.plan(current)
        changes = [i for i in current if isinstance(i, Change)]
        s = self.settings
        model = self.embedder.model
        within = None
        if self.analysis is not None:
            # Results are acknowledged before the offsets are stored (at least once).
            analysed = await self.analysis.run(self._pg, changes)
            within = partial(
                analysed.apply,
                model=model,
                history=self.analysis.history(),
                forgetting=self.analysis.forgetting(),
            )
        span: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if self.tracing is not None:
            span = self.tracing.transaction([c.trace for c in changes])
        began = time.monotonic()
        with span:
            result = await self._pg(
                "write",
                lambda conn: store.write(
                    conn,
                    changes,
                    offsets,
                    s.kafka.group_id,
                    model,
                    self.embedder.dimension,
                    within=within,
                ),
            )
        self.metrics.write_seconds.observe(time.monotonic() - began)
        now = datetime.now(UTC)
        for change in changes:
            if change.event_time != NO_TIME:
                self.metrics.end_to_end_seconds.observe(
                    max(0.0, (now - change.event_time).total_seconds())
                )
        self.tracker.complete(current)
        self._release(changes)
        self.stats.transactions += 1
        self.stats.stored += result.upserted
        self.stats.deleted += sum(1 for c in changes if c.op == "delete")
        for tp, offset in offsets.items():
            self._to_commit[tp] = max(offset, self._to_commit.get(tp, offset))
        self._commit_due.set()

    async def _pg(self, what: str, op: Callable[[store.Conn], Awaitable[T]]) -> T:
        """Run ``op`` on a pooled connection, waiting out a Postgres outage.

        Nothing moves while Postgres is away: offsets are only stored by a transaction
        that succeeds, so retrying the whole operation is always safe.
        """
        attempt = 0
        while True:
            try:
                async with self.pool.acquire() as conn:
                    result = await op(conn)
            except store.PG_UNAVAILABLE as exc:
                self.postgres_down = True
                if self._stop.is_set():
                    raise ShuttingDown(what) from exc
                delay = backoff.capped(attempt, 0.1, 10.0)
                attempt += 1
                log.warning(
                    "postgres unavailable, retrying", during=what, error=repr(exc), delay_s=delay
                )
                await asyncio.sleep(delay)
                continue
            if self.postgres_down:
                log.info("postgres reachable again", during=what)
                self.postgres_down = False
            return result

    def _release(self, items: Sequence[Item]) -> None:
        for item in items:
            if isinstance(item, Change):
                self._keys_in_flight[item.key] -= 1
                if self._keys_in_flight[item.key] <= 0:
                    del self._keys_in_flight[item.key]

    async def _commit_loop(self) -> None:
        """Copy stored offsets to Kafka off the writer's path (the writer never waits for it),
        at most every ``COMMIT_EVERY_S``; ``run`` commits what is left when it stops."""
        while True:
            await self._commit_due.wait()
            self._commit_due.clear()
            await self._commit_to_kafka()
            await asyncio.sleep(self.COMMIT_EVERY_S)

    async def _commit_to_kafka(self) -> None:
        """Kafka's copy of the offsets is for lag monitoring; Postgres already has them.

        What fails stays pending for the next try; partitions no longer assigned are dropped.
        """
        if not self._to_commit or self._revoking:
            return
        assigned = self.consumer.assignment()
        sent = {tp: o for tp, o in self._to_commit.items() if TopicPartition(*tp) in assigned}
        try:
            if sent:
                commit = {TopicPartition(*tp): o for tp, o in sent.items()}
                await asyncio.wait_for(self.consumer.commit(commit), timeout=5.0)
        except (KafkaError, TimeoutError) as exc:
            log.info("kafka offset commit skipped", error=repr(exc))
            return
        for tp in list(self._to_commit):
            # Done, unless it moved on while this commit ran.
            if tp not in sent or self._to_commit[tp] == sent[tp]:
                del self._to_commit[tp]
