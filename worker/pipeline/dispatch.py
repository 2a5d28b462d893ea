"""Dispatch: send full micro-batches to the embed stage, as many at once as it allows.

Batches wait in order while the stage's concurrency ceiling is reached; a batch whose
partition was revoked meanwhile is dropped before it costs a request. What the provider
refuses for good is dead-lettered here (with the original record) and only its offset goes
on; the embedded changes go to the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import structlog

from worker.embedding.providers.base import ConfigurationFault
from worker.embedding.providers.dashscope import SPARSE_MAX_ENTRIES
from worker.embedding.stage import EmbedStage
from worker.envelope import dead_letter
from worker.events import DeadLetter, Reason
from worker.model import Change, Item, Settled
from worker.ops.metrics import Metrics
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
            batch = [c for c in queued if self.tracker.is_current(c)]
            self.release([c for c in queued if not self.tracker.is_current(c)])
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
                outcome = await self.stage.run(batch)
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
        for change, error in outcome.refused:
            letter = dead_letter(
                change.record,
                Reason.PROVIDER_REJECTED,
                error.message,
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
        self.to_writer([*outcome.embedded, *settled])
