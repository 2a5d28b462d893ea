"""Dispatch: send full micro-batches to the embed stage, as many at once as it allows.

Batches wait in order while the stage's concurrency ceiling is reached; a batch whose
partition was revoked meanwhile is dropped before it costs a request. What the provider
refuses for good is dead-lettered here (with the original record) and only its offset goes
on; the embedded changes go to the writer. A chunked document's chunks may be embedded in
several batches: the document goes to the writer when its last chunk is embedded, so its rows
are written together; one refused chunk dead-letters the document (once), and its other
chunks are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import structlog

from worker.embedding.providers.base import SPARSE_MAX_ENTRIES, ConfigurationFault
from worker.embedding.stage import BatchOutcome, EmbedStage
from worker.envelope import dead_letter
from worker.events import DeadLetter, Reason
from worker.model import Change, Item, Settled
from worker.ops.metrics import Metrics
from worker.pipeline.dualwrite import DualWrite
from worker.pipeline.offsets import OffsetTracker
from worker.pipeline.stats import Stats

if TYPE_CHECKING:
    from worker.ops.tracing import Tracing

log = structlog.get_logger(__name__)

Letters = list[tuple[bytes | None, DeadLetter]]


class Dispatcher:
    def __init__(
        self,
        stage: EmbedStage,
        tracker: OffsetTracker,
        *,
        release: Callable[[Sequence[Item]], None],
        send_letters: Callable[[Letters], Awaitable[None]],
        to_writer: Callable[[list[Item]], None],
        on_fatal: Callable[[BaseException], None],
        stats: Stats,
        metrics: Metrics,
        letter_budget: int,
        model: str,
        tracing: Tracing | None = None,
        dual: DualWrite | None = None,
    ) -> None:
        self.stage = stage
        self.tracker = tracker
        self.release = release
        self.send_letters = send_letters
        self.to_writer = to_writer
        self.on_fatal = on_fatal
        self.stats = stats
        self.metrics = metrics
        self.letter_budget = letter_budget
        self.model = model
        self.tracing = tracing
        self.dual = dual
        self._queued: list[list[Change]] = []
        self._embedding = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, batch: list[Change]) -> None:
        self._queued.append(batch)
        self._dispatch()

    async def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _dispatch(self) -> None:
        while self._queued and self._embedding < self.stage.concurrency.maximum:
            queued = self._queued.pop(0)
            batch: list[Change] = []
            stale: list[Change] = []
            for c in queued:  # one epoch check per change
                if not self.tracker.is_current(c):
                    stale.append(c)
                elif not _abandoned(c):
                    batch.append(c)
            self.release(_give_up(stale))
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
            self.on_fatal(exc)

    async def _embed_batch(self, batch: list[Change]) -> None:
        tracing = self.tracing
        span: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if tracing is not None:
            span = tracing.embedding([c.trace for c in batch], self.model)
        try:
            with span:
                if self.dual is None or not self.dual.targets:
                    outcome = await self.stage.run(batch)
                else:
                    outcome = await self._run_beside(batch, self.dual)
        except ConfigurationFault as exc:
            log.error("provider configuration fault; stopping", error=exc.message, code=exc.code)
            self.on_fatal(exc)
            return
        finally:
            self._embedding -= 1
            self._dispatch()
        st = self.stats
        st.batches += 1
        st.tokens_estimated += sum(c.tokens for c in batch)
        self.metrics.batch_size.observe(len(batch))
        st.requests += outcome.requests
        st.retries += outcome.retries
        st.retries_by_cause.update(outcome.retries_by_cause)
        st.throttled += outcome.throttled
        st.texts_embedded += len(outcome.embedded)
        for change in outcome.embedded:
            if change.sparse is not None:
                entries = len(change.sparse.indices())
                st.sparse_vectors += 1
                st.sparse_entries += entries
                st.sparse_at_cap += entries >= SPARSE_MAX_ENTRIES
        letters: Letters = []
        settled: list[Item] = []
        for refused, error in outcome.refused:
            gone = _give_up([refused])
            if not gone:
                continue  # another chunk of its document was refused already
            change = gone[0]
            message = error.message
            if refused.document is not None:
                message = f"chunk {refused.chunk} of {len(change.chunks)}: {message}"
            letter = dead_letter(
                change.record,
                Reason.PROVIDER_REJECTED,
                message,
                error.code,
                namespace=change.namespace,
                id=change.id,
                budget=self.letter_budget,
            )
            letter._trace = change.trace
            letters.append((change.record.key, letter))
            settled.append(Settled(change.topic, change.partition, change.offset, change.epoch))
            self.release([change])
        await self.send_letters(letters)
        self.to_writer([*_complete(outcome.embedded), *settled])

    async def _run_beside(self, batch: list[Change], dual: DualWrite) -> BatchOutcome[Change]:
        """The worker's request and the re-embed targets' at once (dual write): the batch
        waits for the slower, the targets' bounded by their own timeout."""
        beside = asyncio.ensure_future(dual.embed(batch))
        try:
            outcome = await self.stage.run(batch)
        except BaseException:
            beside.cancel()
            raise
        await beside
        return outcome


def _abandoned(change: Change) -> bool:
    return change.document is not None and change.document.abandoned


def _give_up(changes: list[Change]) -> list[Change]:
    """The events these changes stand for, each once: a chunk stands for its document,
    which is abandoned at its first chunk given up (its other chunks are then dropped)."""
    events: list[Change] = []
    for change in changes:
        document = change.document
        if document is None:
            events.append(change)
        elif not document.abandoned:
            document.abandoned = True
            events.append(document)
    return events


def _complete(embedded: list[Change]) -> list[Change]:
    """The changes ready to write: embedded texts, and the documents whose last chunk this
    batch embedded (their rows' vectors are their chunks'; ``vector``, the first chunk's,
    is what the analysis sees)."""
    ready: list[Change] = []
    for change in embedded:
        document = change.document
        if document is None:
            ready.append(change)
            continue
        if document.abandoned:
            continue
        document.waiting -= 1
        if document.waiting == 0:
            assert document.pieces is not None
            document.vector = document.pieces[0].vector
            document.sparse = document.pieces[0].sparse
            ready.append(document)
    return ready
