"""``embedding-worker backfill``: a topic from an offset to its current end, embedded through the
provider's batch interface (about half the real-time price), stored exactly once.

The topic is read in chunks; each chunk is one batch job. Its records are decoded by the
worker's own decoder (a bad record is dead-lettered as in real time) and compared with the
stored content hashes (unchanged content is not embedded again). The newest version of each
key to embed goes into lines of at most the provider's texts per request, per partition. The
job's row (``batch_jobs``, ``worker/sinks/batchjobs.py``) is written before the upload, and
the file's and the batch's ids as soon as the provider answers, so a job that outlives the
process is resumed, never submitted twice. A line failed for a transient cause (a 5xx in the
provider, not run before the job expired) goes again in the job's next round, up to
``rounds``; a refused line's texts, or a line still failing then, are embedded in real time
through the embed stage, with its retries, bisection and ``provider_rejected`` dead letters.
A document that ``oversize_policy = chunk`` splits goes the real-time way too (its chunks
are rows of their own, which a batch line's one-vector-per-record placing does not
express), stored like the worker stores it: all its chunks in the transaction, or, one
chunk refused, none of them and the document dead-lettered once.
A round's rows are stored when the next round is recorded. Dead letters are
acknowledged first; then the rows, the offsets (``consumer_offsets``, the backfill's own
group) and the job's ``stored`` status are one transaction, through the writer's own
``sinks/postgres.write``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from worker import backoff
from worker.config import ConfigError, OversizePolicy, Settings
from worker.embedding.providers import create_embedder
from worker.embedding.providers.base import EmbeddingError, TransientError
from worker.embedding.providers.batch import BatchClient, BatchFailed, Line, Outcome
from worker.embedding.stage import EmbedStage
from worker.envelope import dead_letter, envelope_budget
from worker.events import DeadLetter, Reason, TextType
from worker.kafka.clients import common_options, make_producer, started
from worker.kafka.unreadable import UNREADABLE_ERRORS, Unreadable, isolate
from worker.model import Change, Record
from worker.pipeline.decode import Limits, decode
from worker.sinks import batchjobs
from worker.sinks import postgres as pg
from worker.sinks.batchjobs import Job, Lines, Ranges
from worker.sinks.deadletter import DeadLetterSink
from worker.tools.replay import partitions_of

log = structlog.get_logger(__name__)

Letters = list[tuple[bytes | None, DeadLetter]]
T = TypeVar("T")
# Records per partition read while isolating an unreadable one, when no chunk bounds it.
ISOLATE_RECORDS = 500


@dataclass
class Report:
    """What a backfill did; tokens split by price (batch, about half; real time, full)."""

    records: int = 0
    jobs: int = 0
    resumed: int = 0
    lines: int = 0
    batch_texts: int = 0
    batch_tokens: int = 0
    realtime_texts: int = 0
    realtime_tokens: int = 0
    unchanged: int = 0
    deletes: int = 0
    dead_letters: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Chunk:
    """Records of a job, decoded: what to write, what to embed, what to dead-letter."""

    latest: list[Change] = field(default_factory=list)
    letters: Letters = field(default_factory=list)
    by_position: dict[tuple[int, int], Change] = field(default_factory=dict)


class Backfill:
    def __init__(
        self,
        settings: Settings,
        *,
        topic: str,
        group_id: str,
        start_offset: int | None,
        chunk_records: int,
        poll_initial_s: float,
        poll_max_s: float,
        rounds: int = 3,
    ) -> None:
        self.settings = settings
        self.topic = topic
        self.group_id = group_id
        self.start_offset = start_offset
        self.chunk_records = chunk_records
        self.rounds = rounds
        self.poll = (poll_initial_s, poll_max_s)
        self.limits = Limits.of(settings)
        self.letter_budget = envelope_budget(settings.kafka.dlq_max_message_bytes)
        self.report = Report()

    async def run(self) -> Report:
        s, k = self.settings, self.settings.kafka
        consumer = AIOKafkaConsumer(
            enable_auto_commit=False,
            auto_offset_reset="none",  # a range before the log's start is gone: say so
            isolation_level=k.isolation_level,
            fetch_max_wait_ms=k.fetch_max_wait_ms,
            **common_options(k),
        )
        embedder = create_embedder(s.provider)
        client = BatchClient(s.provider, poll_initial_s=self.poll[0], poll_max_s=self.poll[1])
        conn = await pg.connect(s.postgres.dsn.get_secret_value(), s.provider.dim)
        try:
            async with started(consumer), started(make_producer(k)) as producer:
                self.consumer, self.client, self.conn = consumer, client, conn
                self.stage = EmbedStage(
                    embedder, s.provider, recut=s.oversize_policy is not OversizePolicy.REJECT
                )
                self.sink = DeadLetterSink(producer, k.dlq_topic)
                await self._loop()
        finally:
            await conn.close()
            await client.close()
            await embedder.close()
        return self.report

    async def _loop(self) -> None:
        job = await batchjobs.open_job(self.conn, self.group_id, self.topic)
        if job is not None:
            log.info("resuming a batch job", job=job.id, batch=job.batch_id, file=job.file_id)
            self.report.resumed += 1
            await self._finish(job, await self._decoded(*await self._read(job.ranges)))
        partitions = await partitions_of(self.settings.kafka, self.topic)
        if not partitions:
            raise ConfigError(f"backfill: topic {self.topic!r} does not exist")
        tps = [TopicPartition(self.topic, p) for p in partitions]
        ends = await self._ends(tps)
        while True:
            positions = await self._positions(tps, ends)
            if all(positions[p] >= ends[p] for p in positions):
                return
            records, unreadable, ranges = await self._read_chunk(positions, ends)
            chunk = await self._decoded(records, unreadable)
            lines = self._lines(chunk)
            if not lines:  # deletes, unchanged content, dead letters: nothing to embed
                await self._store(None, chunk, ranges, Outcome("completed"), {})
                continue
            job = await batchjobs.new_job(self.conn, self.group_id, self.topic, ranges, lines)
            await self._finish(job, chunk)

    async def _ends(self, tps: list[TopicPartition]) -> dict[int, int]:
        """Each partition's current end: the high-water mark of a first fetch (not
        ``end_offsets()``, which the embedded Tansu broker answers wrongly, see
        ``kafka/clients.py:at_high_water``)."""
        async with self._assigned(tps, {tp.partition: 0 for tp in tps}, beginning=True):
            while any(self.consumer.highwater(tp) is None for tp in tps):
                await self.consumer.getmany(*tps, timeout_ms=200, max_records=1)
            return {tp.partition: int(self.consumer.highwater(tp) or 0) for tp in tps}

    async def _positions(self, tps: list[TopicPartition], ends: dict[int, int]) -> dict[int, int]:
        """Where each partition continues: the stored offset, else the start asked for
        (or the log's start)."""
        stored = await pg.load_offsets(self.conn, self.group_id, self.topic)
        firsts = await self.consumer.beginning_offsets(tps)
        out = {}
        for tp in tps:
            first = firsts[tp]
            wanted = first if self.start_offset is None else max(first, self.start_offset)
            out[tp.partition] = stored.get(tp.partition, min(wanted, ends[tp.partition]))
        return out

    async def _read_chunk(
        self, positions: dict[int, int], ends: dict[int, int]
    ) -> tuple[list[Record], list[Unreadable], Ranges]:
        """About ``chunk_records`` records from ``positions`` on, none at or past ``ends``."""
        return await self._collect(positions, ends, self.chunk_records)

    async def _read(self, ranges: Ranges) -> tuple[list[Record], list[Unreadable]]:
        """The records of a job's ranges again (a resumed job's, after a restart)."""
        starts = {p: r[0] for p, r in ranges.items()}
        records, unreadable, _ = await self._collect(starts, {p: r[1] for p, r in ranges.items()})
        return records, unreadable

    async def _collect(
        self, starts: dict[int, int], ends: dict[int, int], limit: int | None = None
    ) -> tuple[list[Record], list[Unreadable], Ranges]:
        """The records from ``starts`` up to ``ends`` (at most about ``limit``), the ones the
        client cannot parse (isolated and skipped as the worker does, worker.kafka.unreadable)
        and the range each partition was read over."""
        tps = [TopicPartition(self.topic, p) for p in starts if starts[p] < ends[p]]
        records: list[Record] = []
        unreadable: list[Unreadable] = []
        read_to = {tp: starts[tp.partition] for tp in tps}
        async with self._assigned(tps, starts):
            pending = set(tps)
            while pending and (limit is None or len(records) < limit):
                room = ISOLATE_RECORDS if limit is None else limit - len(records)
                try:
                    got: dict[TopicPartition, list[Any]] = await self.consumer.getmany(
                        *pending, timeout_ms=500, max_records=None if limit is None else room
                    )
                except UNREADABLE_ERRORS as exc:
                    log.warning("a record cannot be parsed; isolating it", error=repr(exc))
                    got, found = await isolate(
                        self.consumer, {tp: read_to[tp] for tp in pending}, room
                    )
                    unreadable += [
                        u
                        for u in found
                        if starts[u.partition] <= u.offset < ends[u.partition]
                        and (u.partition, u.offset)
                        not in {(x.partition, x.offset) for x in unreadable}
                    ]
                    for u in found:  # isolate sought past it: read on from there
                        tp = TopicPartition(u.topic, u.partition)
                        read_to[tp] = max(read_to[tp], u.offset + 1)
                for tp, messages in got.items():
                    end = ends[tp.partition]
                    records += [
                        Record.of(self.topic, tp.partition, m) for m in messages if m.offset < end
                    ]
                    if messages:
                        read_to[tp] = messages[-1].offset + 1
                for tp in list(pending):
                    if await self.consumer.position(tp) >= ends[tp.partition]:
                        pending.discard(tp)
            ranges = {
                tp.partition: (
                    starts[tp.partition],
                    min(await self.consumer.position(tp), ends[tp.partition]),
                )
                for tp in tps
            }
        return records, unreadable, {p: r for p, r in ranges.items() if r[0] < r[1]}

    @contextlib.asynccontextmanager
    async def _assigned(
        self, tps: list[TopicPartition], positions: dict[int, int], beginning: bool = False
    ) -> AsyncIterator[None]:
        self.consumer.assign(tps)
        if beginning and tps:
            await self.consumer.seek_to_beginning(*tps)
        for tp in tps if not beginning else ():
            self.consumer.seek(tp, positions[tp.partition])
        try:
            yield
        finally:
            self.consumer.assign([])

    async def _decoded(self, records: list[Record], unreadable: list[Unreadable]) -> _Chunk:
        """Decode as the worker does; mark content stored already as unchanged. A record the
        client cannot parse is dead-lettered like any bad record (its position only)."""
        chunk = _Chunk(letters=[(None, u.letter()) for u in unreadable])
        changes: list[Change] = []
        for record in records:
            result = decode(record, self.limits)
            if isinstance(result, DeadLetter):
                chunk.letters.append((record.key, result))
            elif isinstance(result, Change):
                changes.append(result)
        self.report.records += len(records) + len(unreadable)
        chunk.latest = pg.newest_per_key(changes)
        upserts = [c for c in chunk.latest if c.op == "upsert"]
        p = self.settings.provider
        known = await pg.stored_hashes(self.conn, [c.key for c in upserts], p.model_name, p.dim)
        for c in upserts:
            c.unchanged = known.get(c.key) == c.content_hash
        chunk.by_position = {(c.partition, c.offset): c for c in chunk.latest}
        return chunk

    def _lines(self, chunk: _Chunk) -> Lines:
        """Lines of at most ``max_texts`` texts, per partition in offset order. Documents
        only: the OpenAI-compatible body has no ``text_type``, so a query-type text goes the
        real-time way, which sends it (DashScope's native dialect)."""
        by_partition: dict[int, list[Change]] = defaultdict(list)
        for c in chunk.latest:
            # A chunked document goes the real-time way (the module's docstring).
            fresh = c.op == "upsert" and not c.unchanged and not c.chunks
            if fresh and c.text_type is TextType.DOCUMENT:
                by_partition[c.partition].append(c)
        size = self.client.max_texts
        lines: Lines = {}
        for partition, changes in sorted(by_partition.items()):
            changes.sort(key=lambda c: c.offset)
            for i in range(0, len(changes), size):
                part = changes[i : i + size]
                lines[f"{partition}-{part[0].offset}"] = [(c.partition, c.offset) for c in part]
        return lines

    async def _finish(self, job: Job, chunk: _Chunk) -> None:
        """Submit the job unless it was (once per round), wait for it, store what it gave;
        lines failed for a transient cause go again in the next round, up to ``rounds``."""
        while True:
            if job.batch_id is None:
                await self._submit(job, chunk)
            assert job.batch_id is not None
            batch = await self.client.wait(job.batch_id)
            counts = {custom_id: len(positions) for custom_id, positions in job.lines.items()}
            try:
                outcome = await self._retrying(
                    functools.partial(self.client.outcome, batch, counts)
                )
            except BatchFailed:
                # Refused as a whole or cancelled: nothing ran; the next run submits it again.
                await self.conn.execute(
                    "UPDATE batch_jobs SET file_id = NULL, batch_id = NULL, "
                    "status = 'uploading' WHERE id = $1",
                    job.id,
                )
                raise
            again = {
                custom_id: job.lines[custom_id]
                for custom_id, error in outcome.failed.items()
                if isinstance(error, TransientError) and custom_id in job.lines
            }
            if not again or job.round >= self.rounds:
                await self._store(job, chunk, job.ranges, outcome, job.lines)
                return
            await self._store_round(job, chunk, outcome, again)

    async def _submit(self, job: Job, chunk: _Chunk) -> None:
        """Upload and create, each answer recorded at once. Before a creation, the batches
        on the file are looked up: after a creation whose answer was lost (here, or in a
        process that died), the job is found instead of started a second time."""
        texts = {
            custom_id: [chunk.by_position[pos].text for pos in positions]
            for custom_id, positions in job.lines.items()
            if all(pos in chunk.by_position for pos in positions)
        }

        async def submit() -> str:
            if job.file_id is None:
                file_id = await self.client.upload([Line(k, v) for k, v in texts.items()])
                await batchjobs.uploaded(self.conn, job, file_id)
            assert job.file_id is not None
            found = await self.client.find(job.file_id)
            if found is not None:
                return found
            metadata = {"job": str(job.id), "group": self.group_id}
            return await self.client.create(job.file_id, metadata)

        batch_id = await self._retrying(submit)
        await batchjobs.submitted(self.conn, job, batch_id)
        self.report.jobs += 1
        self.report.lines += len(texts)
        log.info("batch job submitted", job=job.id, batch=batch_id, lines=len(texts))

    async def _retrying(self, op: Callable[[], Awaitable[T]]) -> T:
        """``op`` again after a transient error, with the provider's backoff settings."""
        p = self.settings.provider
        attempt = 0
        while True:
            try:
                return await op()
            except TransientError as exc:
                if p.max_retries is not None and attempt >= p.max_retries:
                    raise
                delay = backoff.jittered(
                    attempt, p.backoff_initial_s, p.backoff_max_s, exc.retry_after
                )
                log.warning("batch request failed, retrying", error=exc.message, delay_s=delay)
                attempt += 1
                await asyncio.sleep(delay)

    async def _store_round(self, job: Job, chunk: _Chunk, outcome: Outcome, again: Lines) -> None:
        """Store what a round embedded (rows only: the offsets wait for the last round),
        with the job moved to its next round, which holds only the lines in ``again``.

        The texts of the lines that failed for good go the real-time way first. A row stored
        here is the round's checkpoint: after a restart, its content hash marks it unchanged.
        """
        self._place(chunk, outcome, job.lines)
        retried = {pos for positions in again.values() for pos in positions}
        now = [c for c in self._unembedded(chunk) if (c.partition, c.offset) not in retried]
        realtime_before = self.report.realtime_tokens
        letters = await self._realtime(now)
        await self.sink.send(letters)
        self.report.dead_letters += len(letters)
        done = [c for c in chunk.latest if c.op == "upsert" and c.vector is not None]
        realtime = self.report.realtime_tokens - realtime_before
        log.info(
            "batch round stored; submitting its failed lines again",
            job=job.id,
            round=job.round,
            rows=len(done),
            again=len(again),
        )

        async def advance(conn: pg.Conn) -> None:
            await batchjobs.next_round(conn, job, again, outcome.tokens, realtime)

        p = self.settings.provider
        await pg.write(self.conn, done, {}, self.group_id, p.model_name, p.dim, within=advance)
        # Stored, or dead-lettered: the last round has nothing more to do for them.
        settled = {(c.partition, c.offset) for c in [*done, *now]}
        chunk.latest = [c for c in chunk.latest if (c.partition, c.offset) not in settled]

    async def _store(
        self, job: Job | None, chunk: _Chunk, ranges: Ranges, outcome: Outcome, lines: Lines
    ) -> None:
        """Vectors placed by custom_id, the rest embedded in real time, then one transaction."""
        realtime_before = self.report.realtime_tokens
        self._place(chunk, outcome, lines)
        for custom_id, error in sorted(outcome.failed.items()):
            log.warning(
                "batch line failed; embedding it in real time",
                line=custom_id,
                code=error.code,
                error=error.message,
            )
        letters = list(chunk.letters)
        letters += await self._realtime(self._unembedded(chunk))
        await self.sink.send(letters)
        self.report.dead_letters += len(letters)
        self.report.unchanged += sum(1 for c in chunk.latest if c.unchanged and c.vector is None)
        self.report.deletes += sum(1 for c in chunk.latest if c.op == "delete")
        writable = [
            c for c in chunk.latest if c.op == "delete" or c.vector is not None or c.unchanged
        ]
        offsets = {(self.topic, p): end for p, (_, end) in ranges.items()}
        realtime = self.report.realtime_tokens - realtime_before

        async def mark(conn: pg.Conn) -> None:
            if job is not None:
                await batchjobs.stored(conn, job, outcome.tokens, realtime)

        p = self.settings.provider
        # ``within`` always makes it one transaction: rows, offsets and the job's status.
        await pg.write(
            self.conn, writable, offsets, self.group_id, p.model_name, p.dim, within=mark
        )
        log.info("batch job stored", job=None if job is None else job.id, rows=len(writable))

    def _place(self, chunk: _Chunk, outcome: Outcome, lines: Lines) -> None:
        """A round's vectors onto the changes, by custom_id and then by index."""
        for custom_id, embeddings in outcome.embedded.items():
            for pos, vector in zip(lines[custom_id], embeddings.vectors, strict=True):
                change = chunk.by_position.get(pos)
                if change is not None:
                    change.vector = vector
                    self.report.batch_texts += 1
        self.report.batch_tokens += outcome.tokens

    @staticmethod
    def _unembedded(chunk: _Chunk) -> list[Change]:
        return [
            c for c in chunk.latest if c.op == "upsert" and c.vector is None and not c.unchanged
        ]

    async def _realtime(self, changes: Sequence[Change]) -> Letters:
        """Embed through the real-time path; what it refuses for good is dead-lettered. A
        chunked document gets its first chunk's vector once every chunk has one; a refused
        chunk dead-letters its document once and leaves it without a vector (not stored)."""
        letters: Letters = []
        by_type: dict[Any, list[Change]] = defaultdict(list)
        for c in changes:
            by_type[c.text_type].extend(c.embeddables())
        refused: set[int] = set()
        for group in by_type.values():
            outcome = await self.stage.run(group)
            self.report.realtime_texts += len(outcome.embedded)
            self.report.realtime_tokens += sum(c.tokens for c in group)
            for piece, error in outcome.refused:
                change = piece.document or piece
                if id(change) not in refused:
                    refused.add(id(change))
                    letters.append((change.record.key, _refused(change, error, self.letter_budget)))
        for c in changes:
            if c.pieces is not None:
                done = id(c) not in refused and all(p.vector is not None for p in c.pieces)
                c.vector = c.pieces[0].vector if done else None
        return letters


def _refused(change: Change, error: EmbeddingError, budget: int) -> DeadLetter:
    return dead_letter(
        change.record,
        Reason.PROVIDER_REJECTED,
        error.message,
        error.code,
        namespace=change.namespace,
        id=change.id,
        budget=budget,
    )
