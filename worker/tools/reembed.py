"""``embedding-worker reembed``: a second provider configuration (a target: model, dimension,
instruct, ...) filled beside ``embeddings`` from the stored content, while the worker keeps
indexing into ``embeddings`` and search answers from it; then a switch in one transaction,
and the old table dropped when the operator says so.

The catch-up is the guarantee, whether the worker also writes into the target or not
(``reembed.dual_write``, worker/pipeline/dualwrite.py: then the passes find little to do).
Each pass (``worker/sinks/reembed.py``) makes the target equal ``embeddings`` as it was when
each page was read: new or changed content embedded, new versions copied, deleted keys
deleted. ``start`` runs the fill (resuming a killed one after its last stored page) and one
catch-up pass; ``switch`` runs catch-up passes, then takes ``embeddings`` in EXCLUSIVE mode
(writers wait, search goes on), runs a last pass that embeds what is left (at most
``max_locked`` rows, else nothing changes), checks that nothing differs, and renames the
tables in the same transaction. So no event stored before the switch is missing or stale in
the target, and no event is stored in the old table after it.

Requests go through the worker's own ``EmbedStage`` with the target's provider settings: the
same retries, bisection, breaker and RPM/TPM limiter; a row the provider refuses for good is
dead-lettered (``provider_rejected``, its source offset kept for ``dead-letters --replay``)
and left out of the target. The limits are the re-embed's own (a separate process): give it
the share of the quota the worker leaves (``--rpm``/``--tpm``). With ``via="batch"``, each
page's documents go through the batch interface first (``_by_batch``), the rest as above.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer

from worker.config import ConfigError, ProviderKind, ProviderSettings, Settings, load_settings
from worker.embedding.providers.batch import BatchClient, BatchFailed, Line
from worker.embedding.stage import EmbedStage, Text
from worker.envelope import dead_letter, envelope_budget
from worker.events import DeadLetter, Reason, TextType
from worker.kafka.clients import make_producer
from worker.model import Record
from worker.pipeline.dualwrite import started_embedder
from worker.read import index
from worker.sinks import postgres as pg
from worker.sinks import reembed as sql
from worker.sinks.deadletter import DeadLetterSink
from worker.sinks.postgres import SchemaError
from worker.sinks.reembed import Counts, Page, Row, Shape, Target
from worker.tokens import estimate_tokens, truncate_to_tokens
from worker.tools.progress import Progress

log = structlog.get_logger(__name__)

# Advisory lock key space of re-embeds (one process per target at a time).
LOCK_ID = 0x72656D62  # "remb"
# The switch's lock: taken again after a deadlock with a writer or a lock_timeout, this often.
LOCK_ATTEMPTS = 3
LOCK_FAULTS = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.LockNotAvailableError)
# Options of `reembed start` that make a target's provider settings.
OPTIONS = ("kind", "model", "dimension", "base_url", "instruct", "output_type", "rpm", "tpm")
# Settings resolved for the current provider's kind, not carried to another kind.
PER_KIND = ("model", "dimension", "base_url", "max_concurrency", "output_type")


class Busy(Exception):
    """Another process holds this target (start, switch or drop)."""


class SwitchRefused(Exception):
    """Too much is left to embed under the lock, or the last pass did not converge."""


def target_provider(
    settings: Settings, config_file: str | None, options: dict[str, Any]
) -> ProviderSettings:
    """The current provider settings with ``options`` over them, validated as the worker's
    (the API key is the current one; settings resolved for another kind are dropped)."""
    given = {k: v for k, v in options.items() if v is not None}
    current = settings.provider.model_dump(mode="json", exclude={"api_key"})
    if given.get("kind", current["kind"]) != current["kind"]:
        current = {k: v for k, v in current.items() if k not in PER_KIND}
    key = settings.provider.api_key
    provider = {**current, **given, "api_key": None if key is None else key.get_secret_value()}
    return load_settings(config_file, provider=provider).provider


def stored_provider(provider: ProviderSettings) -> dict[str, Any]:
    return provider.model_dump(mode="json", exclude={"api_key"})


@dataclass
class Report:
    rows: int = 0  # rows of ``embeddings`` read
    embedded: int = 0
    copied: int = 0
    refused: int = 0
    tokens: int = 0


class Reembed:
    def __init__(
        self,
        settings: Settings,
        name: str,
        config_file: str | None = None,
        page_rows: int = 500,
        progress: bool = True,
        stop: asyncio.Event | None = None,
        via: str = "realtime",
        poll_s: tuple[float, float] = (5.0, 300.0),
    ) -> None:
        """``via`` "batch": ``start`` sends each page's documents through the provider's batch
        interface (about half the price), the rest, and the lines that fail, in real time."""
        self.settings = settings
        self.name = sql.check_name(name)
        self.config_file = config_file
        self.page_rows = page_rows
        self.progress = progress
        self.stop = stop or asyncio.Event()
        self.report = Report()
        self.via = via
        self.poll_s = poll_s
        self._batch: BatchClient | None = None
        self._producer: AIOKafkaProducer | None = None
        self._sink: DeadLetterSink | None = None

    # ---- commands ---------------------------------------------------------------------

    async def start(self, options: dict[str, Any]) -> Report:
        """Create the target (or resume it), fill it, then one catch-up pass."""
        async with self._held() as conn:
            target = await sql.load(conn, self.name)
            given = {k: v for k, v in options.items() if v is not None}
            if target is None:
                provider = target_provider(self.settings, self.config_file, options)
                target = await sql.create(
                    conn,
                    self.name,
                    stored_provider(provider),
                    provider.model_name,
                    provider.dim,
                )
                log.info("re-embed target created", target=self.name, table=target.table)
            else:
                self._check_open(target)
                provider = self._provider(target)
                asked = stored_provider(target_provider(self.settings, self.config_file, given))
                changed = [k for k in given if asked[k] != target.provider.get(k)]
                if given and changed:
                    raise ConfigError(
                        f"re-embed {self.name!r} exists with other settings "
                        f"({', '.join(sorted(changed))}); `reembed drop {self.name}` first, or "
                        "start another target"
                    )
            await sql.check_table(conn, target)
            if self.via == "batch":
                if provider.kind is ProviderKind.LOCAL:
                    raise ConfigError(
                        "reembed start --via batch needs a provider with a batch interface "
                        "(provider.kind dashscope or openai)"
                    )
                self._batch = BatchClient(
                    provider, poll_initial_s=self.poll_s[0], poll_max_s=self.poll_s[1]
                )
            async with self._stage(target, provider) as stage:
                # The fill (resumed where it stopped), then one catch-up pass.
                await self._passes(conn, target, stage, until=max(target.passes, 1) + 1)
        return self.report

    async def switch(self, max_locked: int, lock_timeout_s: float) -> Counts:
        """Catch up, then the final pass and the swap in one transaction under the lock."""
        async with self._held() as conn:
            target = await self._open(conn)
            s = await sql.shape(conn)
            hnsw = await self._hnsw_like_current(conn, target)
            async with self._stage(target, self._provider(target)) as stage:
                for _ in range(3):  # catch-up passes without the lock, while much is left
                    await self._passes(conn, target, stage, until=target.passes + 1)
                    left = await sql.counts(conn, s, target)
                    if left.pending <= max_locked:
                        break
                for attempt in range(1, LOCK_ATTEMPTS + 1):
                    try:
                        final = await self._locked(
                            conn, s, target, stage, max_locked, lock_timeout_s, hnsw
                        )
                        break
                    except LOCK_FAULTS as exc:
                        # A writer that read the table in its transaction waits for our lock
                        # while our rename waits for its read: Postgres ends one of the two.
                        if attempt == LOCK_ATTEMPTS:
                            raise SwitchRefused(
                                f"could not take `embeddings` ({exc}); nothing was switched"
                            ) from None
                        log.warning(
                            "switch: lock not taken, again", error=str(exc), attempt=attempt
                        )
                        reloaded = await sql.load(conn, self.name)
                        assert reloaded is not None
                        target = reloaded
        log.info("re-embed switched", target=self.name, rows=final.target)
        return final

    async def _locked(
        self,
        conn: pg.Conn,
        s: Shape,
        target: Target,
        stage: EmbedStage,
        max_locked: int,
        lock_timeout_s: float,
        hnsw: str | None,
    ) -> Counts:
        """The switch's transaction: the lock, the last pass, the check, the swap."""
        async with conn.transaction():
            await sql.lock_current(conn, lock_timeout_s)
            left = await sql.counts(conn, s, target)
            if left.pending > max_locked:
                raise SwitchRefused(
                    f"{left.pending} rows still differ (more than --max-locked "
                    f"{max_locked}, which would be embedded while writers wait); run "
                    "`reembed start` again, or raise --max-locked"
                )
            target.cursor = None
            await self._pass(conn, s, target, stage, None)
            final = await sql.counts(conn, s, target)
            if final.pending:
                raise SwitchRefused(
                    f"{final.pending} rows still differ after the final pass (stopped?); "
                    "nothing was switched"
                )
            decisions = await sql.decisions_of(conn, self.settings.provider.model_name)
            await sql.swap(conn, target, {} if hnsw is None else {hnsw: index.NAME})
            await self._carry(conn, target, stage, decisions)
        return final

    async def _carry(
        self, conn: pg.Conn, target: Target, stage: EmbedStage, decisions: list[sql.Decision]
    ) -> None:
        """Moderation decisions become the target model's examples: the decided event's
        vector in the target, else their text embedded (one the provider refuses is left
        out, logged)."""
        await sql.stored_vectors(conn, decisions)
        texts = [d for d in decisions if d.vector is None]
        cap = stage.settings.max_tokens_per_text
        cut = [truncate_to_tokens(d.content, cap) for d in texts]
        items = [Text(t, TextType.DOCUMENT, estimate_tokens(t)) for t in cut]
        outcome = await stage.run(items)
        for decision, item in zip(texts, items, strict=True):
            decision.vector = item.vector
        for item, error in outcome.refused:
            log.warning(
                "switch: a decision's text refused", text=item.text[:80], error=error.message
            )
        await sql.add_decisions(conn, target, decisions)
        if decisions:
            log.info(
                "switch: decisions carried over", decisions=len(decisions), embedded=len(texts)
            )

    async def _hnsw_like_current(self, conn: pg.Conn, target: Target) -> str | None:
        """The current table's HNSW index (``embedding-worker index``), built on the target
        too with the same parameters before the switch, so search stays as fast after it."""
        current = await index.state(conn)
        if current is None or not current.valid:
            return None
        options = await conn.fetchval(
            "SELECT reloptions FROM pg_class WHERE oid = to_regclass($1)", index.NAME
        )
        given = dict(o.split("=", 1) for o in options or [])
        m, ef = int(given.get("m", 16)), int(given.get("ef_construction", 64))
        name = f"{target.table}_hnsw"
        statement = index.statement(target.dimension, m, ef).replace(
            f"{index.NAME} ON {sql.CURRENT} ", f"{name} ON {target.table} "
        )
        log.info("building the target's HNSW index", target=self.name, index=name, m=m, ef=ef)
        await index.build(conn, name, statement)
        return name

    async def drop(self) -> str:
        async with self._held() as conn:
            target = await sql.load(conn, self.name)
            if target is None or target.state == "dropped":
                raise ConfigError(f"re-embed {self.name!r}: nothing to drop")
            return await sql.drop(conn, target)

    # ---- passes -----------------------------------------------------------------------

    async def _passes(self, conn: pg.Conn, target: Target, stage: EmbedStage, until: int) -> None:
        s = await sql.shape(conn)
        while target.passes < until and not self.stop.is_set():
            total = await conn.fetchval(f"SELECT count(*) FROM {sql.CURRENT}")
            label = f"{self.name} pass {target.passes + 1}"
            bar = None
            if self.progress:
                done = await self._before_cursor(conn, s, target) if target.cursor else 0
                bar = Progress(label, int(total), base=done)
            try:
                await self._pass(conn, s, target, stage, bar)
            finally:
                if bar is not None:
                    bar.close()

    async def _before_cursor(self, conn: pg.Conn, s: Shape, target: Target) -> int:
        cols = ", ".join(s.key)
        params = ", ".join(f"${i + 1}::{t}" for i, t in enumerate(s.key_types))
        where = f"({cols}) <= ({params})"
        found = await conn.fetchval(
            f"SELECT count(*) FROM {sql.CURRENT} WHERE {where}", *(target.cursor or [])
        )
        return int(found)

    async def _pass(
        self, conn: pg.Conn, s: Shape, target: Target, stage: EmbedStage, bar: Progress | None
    ) -> None:
        """Pages until the end of ``embeddings`` (or a stop, between two pages)."""
        while not self.stop.is_set():
            page = await sql.read_page(conn, s, target, self.page_rows)
            cap = stage.settings.max_tokens_per_text
            for row in page.embed:
                row.text = truncate_to_tokens(row.text, cap)
            tokens = 0
            if self._batch is not None:
                tokens += await self._by_batch(conn, target, page, self._batch)
            refused, letters, realtime = await self._embed(stage, page)
            tokens += realtime
            vectors = [r.vector for r in page.embed if r.vector is not None]
            sql.guard(target, stage.embedder.model, vectors)
            if letters:
                await (await self._letters()).send(letters)
            async with conn.transaction():
                await sql.write_page(conn, s, target, page, refused, tokens)
            self.report.rows += page.rows
            self.report.embedded += len(vectors)
            self.report.copied += len(page.copy)
            self.report.refused += len(refused)
            self.report.tokens += tokens
            if bar is not None:
                bar.add(page.rows)
            if page.end:
                return

    async def _embed(
        self, stage: EmbedStage, page: Page
    ) -> tuple[list[Row], list[tuple[bytes | None, DeadLetter]], int]:
        """The page's texts not embedded yet through the stage, as many requests at once as
        it allows; returns the refused rows, their dead letters and the tokens sent."""
        budget = stage.settings.max_tokens_per_request
        by_type: dict[Any, list[Row]] = defaultdict(list)
        todo = [row for row in page.embed if row.vector is None]
        for row in todo:
            by_type[row.text_type].append(row)
        batches: list[list[Row]] = []
        for rows in by_type.values():
            batch: list[Row] = []
            for row in rows:
                if batch and (
                    len(batch) >= stage.max_texts
                    or sum(r.tokens for r in batch) + row.tokens > budget
                ):
                    batches.append(batch)
                    batch = []
                batch.append(row)
            if batch:
                batches.append(batch)
        outcomes = await asyncio.gather(*(stage.run(b) for b in batches))
        refused = list(page.no_content)
        letters: list[tuple[bytes | None, DeadLetter]] = [
            (r.id.encode(), self._letter(r, Reason.NO_CONTENT, "no stored content", None))
            for r in page.no_content
        ]
        for outcome in outcomes:
            for row, error in outcome.refused:
                refused.append(row)
                letter = self._letter(row, Reason.PROVIDER_REJECTED, error.message, error.code)
                letters.append((row.id.encode(), letter))
        tokens = sum(r.tokens for r in todo if r.vector is not None)
        return refused, letters, tokens

    async def _by_batch(
        self, conn: pg.Conn, target: Target, page: Page, client: BatchClient
    ) -> int:
        """The page's documents through one batch job (the OpenAI-compatible body has no
        ``text_type``: query-type texts go in real time). The job is recorded before its file
        is uploaded and each id as the provider answers, so a killed start resumes it (found
        by its file rather than created again); a line that fails, or a row changed since
        the job was made, is left to the real-time path. Returns the tokens billed."""
        docs = {
            (r.key, r.content_hash.hex()): r for r in page.embed if r.text_type is TextType.DOCUMENT
        }
        job = target.job
        if job is not None and (job["after"] != target.cursor or job["file_id"] is None):
            job = None  # another page's, or never uploaded: made again from this page
        if job is None:
            if not docs:
                return 0
            rows = list(docs.values())
            size = client.max_texts
            lines = {
                str(i // size): [[*r.key, r.content_hash.hex()] for r in rows[i : i + size]]
                for i in range(0, len(rows), size)
            }
            job = {"after": target.cursor, "lines": lines, "file_id": None, "batch_id": None}
            await sql.save_job(conn, target, job)
            texts = [Line(cid, [docs[_entry(e)].text for e in es]) for cid, es in lines.items()]
            job["file_id"] = await client.upload(texts)
            await sql.save_job(conn, target, job)
        if job["batch_id"] is None:
            found = await client.find(job["file_id"])
            job["batch_id"] = found or await client.create(job["file_id"], {"reembed": self.name})
            await sql.save_job(conn, target, job)
            log.info("re-embed batch job submitted", target=self.name, batch=job["batch_id"])
        batch = await client.wait(job["batch_id"])
        counts = {cid: len(entries) for cid, entries in job["lines"].items()}
        try:
            outcome = await client.outcome(batch, counts)
        except BatchFailed:
            await sql.save_job(conn, target, None)  # nothing ran: the next start submits again
            raise
        for cid, embeddings in outcome.embedded.items():
            for entry, vector in zip(job["lines"][cid], embeddings.vectors, strict=True):
                row = docs.get(_entry(entry))
                if row is not None:
                    row.vector = vector
        for cid, error in sorted(outcome.failed.items()):
            log.warning(
                "batch line failed; embedding it in real time", line=cid, error=error.message
            )
        return outcome.tokens

    def _letter(self, row: Row, reason: Reason, message: str, code: str | None) -> DeadLetter:
        """The row's event, named by its source position (``dead-letters --replay`` reads it
        there again); no copy of the value, which the table does not keep as it was."""
        topic, partition, offset = row.source
        record = Record(topic, partition, offset, row.id.encode(), None)
        return dead_letter(
            record,
            reason,
            f"re-embed {self.name}: {message}",
            code,
            namespace=row.namespace,
            id=row.id,
            budget=envelope_budget(self.settings.kafka.dlq_max_message_bytes),
        )

    async def _letters(self) -> DeadLetterSink:
        """Started at the first dead letter: a re-embed without one needs no broker."""
        if self._sink is None:
            k = self.settings.kafka
            self._producer = make_producer(k)
            await self._producer.start()
            self._sink = DeadLetterSink(self._producer, k.dlq_topic)
        return self._sink

    # ---- set-up -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _held(self) -> AsyncIterator[pg.Conn]:
        """A checked connection holding the target's advisory lock."""
        s = self.settings
        conn = await pg.connect(s.postgres.dsn.get_secret_value(), s.provider.dim)
        try:
            if await conn.fetchval("SELECT to_regclass('reembed_targets')") is None:
                raise SchemaError(
                    "table `reembed_targets` does not exist (migration 0011_reembed.sql): run "
                    "`embedding-worker migrate`"
                )
            if not await conn.fetchval(
                "SELECT pg_try_advisory_lock($1, hashtext($2))", LOCK_ID, self.name
            ):
                raise Busy(f"re-embed {self.name!r} is in use by another process")
            yield conn
        finally:
            if self._batch is not None:
                await self._batch.close()
                self._batch = None
            if self._producer is not None:
                await self._producer.stop()
                self._producer, self._sink = None, None
            await conn.close()

    @contextlib.asynccontextmanager
    async def _stage(self, target: Target, provider: ProviderSettings) -> AsyncIterator[EmbedStage]:
        embedder = await started_embedder(target, provider)
        try:
            yield EmbedStage(embedder, provider)
        finally:
            await embedder.close()

    def _provider(self, target: Target) -> ProviderSettings:
        key = self.settings.provider.api_key
        stored = {**target.provider, "api_key": None if key is None else key.get_secret_value()}
        return load_settings(self.config_file, provider=stored).provider

    async def _open(self, conn: pg.Conn) -> Target:
        target = await sql.load(conn, self.name)
        if target is None:
            raise ConfigError(f"re-embed {self.name!r} does not exist: `reembed start` it first")
        self._check_open(target)
        await sql.check_table(conn, target)
        return target

    def _check_open(self, target: Target) -> None:
        if target.state != "filling":
            raise ConfigError(
                f"re-embed {self.name!r} is {target.state}; start another target"
                + (f" (or `reembed drop {self.name}`)" if target.state == "switched" else "")
            )


def _entry(entry: list[Any]) -> tuple[tuple[Any, ...], str]:
    """A job line's ``[key..., content hash hex]`` as the page's ``(key, hash)``."""
    return tuple(entry[:-1]), str(entry[-1])


@dataclass(frozen=True)
class Status:
    target: Target
    counts: Counts | None  # None once switched or dropped
    eta_s: float | None


async def status(settings: Settings, name: str | None) -> list[Status]:
    """Each target (or ``name``): its state, what a pass would still do, and an ETA at the
    rate it has embedded so far."""
    s = settings
    conn = await pg.connect(s.postgres.dsn.get_secret_value(), s.provider.dim)
    try:
        if name is not None:
            found = await sql.load(conn, sql.check_name(name))
            if found is None:
                raise ConfigError(f"re-embed {name!r} does not exist")
            targets = [found]
        else:
            targets = await sql.all_targets(conn)
        shape = await sql.shape(conn)
        out = []
        for t in targets:
            if t.state != "filling":
                out.append(Status(t, None, None))
                continue
            counts = await sql.counts(conn, shape, t)
            seconds = await conn.fetchval(
                "SELECT extract(epoch FROM updated_at - created_at) FROM reembed_targets "
                "WHERE name = $1",
                t.name,
            )
            done = t.embedded + t.copied
            rate = done / float(seconds) if seconds and done else None
            out.append(Status(t, counts, None if rate is None else counts.pending / rate))
        return out
    finally:
        await conn.close()


def describe(found: Sequence[Status]) -> list[str]:
    from worker.tools.progress import clock

    lines = []
    for st in found:
        t = st.target
        head = f"{t.name}: {t.state}, {t.model} {t.dimension}-d, table {t.table}"
        if t.state == "switched":
            head += f" is `embeddings` now; the table before: {sql.retired_of(t.name)}"
        lines.append(head)
        c = st.counts
        if c is not None:
            where = "a pass is under way" if t.cursor is not None else "between passes"
            lines.append(
                f"  {c.target:,}/{c.current:,} rows, {c.pending:,} to embed, copy or delete, "
                f"{c.refused:,} refused; {t.passes} passes done ({where}); ETA {clock(st.eta_s)}"
            )
        lines.append(f"  embedded {t.embedded:,} ({t.tokens:,} tokens), copied {t.copied:,}")
    return lines
