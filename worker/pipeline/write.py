"""Write: store what is ready (rows, analysis state, offsets) in one Postgres transaction.

Natural batching: an idle writer adds no wait (a fixed linger was most of an event's
latency at moderate rates), and under load transactions grow by themselves, up to
``write_max_rows``, while the one before them runs. Analysis results are produced and
acknowledged before the transaction that stores the offsets (at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING

import structlog

from worker.analysis.stage import AnalysisStage
from worker.model import NO_TIME, Change, Item
from worker.ops.metrics import Metrics
from worker.pipeline.offsets import TP, OffsetTracker
from worker.pipeline.stats import Stats
from worker.sinks.store import ShuttingDown, Store

if TYPE_CHECKING:
    from worker.ops.tracing import Tracing

log = structlog.get_logger(__name__)


class Writer:
    def __init__(
        self,
        store: Store,
        tracker: OffsetTracker,
        *,
        on_stored: Callable[[dict[TP, int]], None],
        group_id: str,
        model: str,
        dimension: int,
        max_rows: int,
        release: Callable[[Sequence[Item]], None],
        on_fatal: Callable[[BaseException], None],
        stats: Stats,
        metrics: Metrics,
        analysis: AnalysisStage | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.store = store
        self.tracker = tracker
        # Told the offsets each transaction stored (the Kafka commits).
        self.on_stored = on_stored
        self.group_id = group_id
        self.model = model
        self.dimension = dimension
        self.max_rows = max_rows
        self.release = release
        self.on_fatal = on_fatal
        self.stats = stats
        self.metrics = metrics
        self.analysis = analysis
        self.tracing = tracing
        self.ready: list[Item] = []
        self.writing = False
        self._has_work = asyncio.Event()

    def enqueue(self, items: list[Item]) -> None:
        if items:
            self.ready.extend(items)
            self._has_work.set()

    @property
    def busy(self) -> bool:
        return self.writing or bool(self.ready)

    async def loop(self) -> None:
        """Write what is ready at once; what arrives meanwhile waits for the next transaction."""
        while True:
            await self._has_work.wait()
            self._has_work.clear()
            self.writing = True
            try:
                while self.ready:
                    await self._write_once()
            except ShuttingDown:
                return
            except Exception as exc:
                log.exception("postgres write failed; stopping")
                self.on_fatal(exc)
                return
            finally:
                self.writing = False

    async def _write_once(self) -> None:
        items, self.ready = self.ready[: self.max_rows], self.ready[self.max_rows :]
        current = [i for i in items if self.tracker.is_current(i)]
        self.release([i for i in items if not self.tracker.is_current(i)])
        if not current:
            return
        offsets = self.tracker.plan(current)
        changes = [i for i in current if isinstance(i, Change)]
        within = None
        if self.analysis is not None:
            analysed = await self.analysis.run(self.store.run, changes)
            within = partial(
                analysed.apply,
                model=self.model,
                history=self.analysis.history(),
                forgetting=self.analysis.forgetting(),
            )
        span: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if self.tracing is not None:
            span = self.tracing.transaction([c.trace for c in changes])
        began = time.monotonic()
        with span:
            result = await self.store.write(
                changes, offsets, self.group_id, self.model, self.dimension, within=within
            )
        self.metrics.write_seconds.observe(time.monotonic() - began)
        now = datetime.now(UTC)
        for change in changes:
            if change.event_time != NO_TIME:
                self.metrics.end_to_end_seconds.observe(
                    max(0.0, (now - change.event_time).total_seconds())
                )
        self.tracker.complete(current)
        self.release(changes)
        self.stats.transactions += 1
        self.stats.stored += result.upserted
        self.stats.deleted += sum(1 for c in changes if c.op == "delete")
        self.on_stored(offsets)
