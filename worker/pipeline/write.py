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
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING

import structlog

from worker.analysis.stage import AnalysisStage
from worker.model import NO_TIME, Change, Item
from worker.ops.metrics import Metrics
from worker.pipeline.dualwrite import DualWrite
from worker.pipeline.offsets import TP, OffsetTracker
from worker.pipeline.stats import Stats
from worker.sinks.postgres import Conn
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
        ordered: bool = False,
        dual: DualWrite | None = None,
    ) -> None:
        """``ordered`` (the runner sets it when the analysis runs): rows are written in each
        partition's stream order, an item waiting until every earlier event of its partition
        is ready too (embedding batches finish out of order), so that the analysis sees each
        namespace's history in order."""
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
        self.ordered = ordered
        self.dual = dual  # reembed.dual_write: the targets' rows join the transaction
        self.ready: list[Item] = []
        self.writing = False
        self._has_work = asyncio.Event()

    def enqueue(self, items: list[Item]) -> None:
        if items:
            self.ready.extend(items)
            self._has_work.set()

    @property
    def busy(self) -> bool:
        """Writing, or holding rows it can write now (not rows waiting for earlier ones)."""
        if self.writing or not self.ready:
            return self.writing
        return not self.ordered or any(self.tracker.in_order(self.ready))

    async def loop(self) -> None:
        """Write what is ready at once; what arrives meanwhile waits for the next transaction."""
        while True:
            await self._has_work.wait()
            self._has_work.clear()
            self.writing = True
            try:
                while self.ready and await self._write_once():
                    pass
            except ShuttingDown:
                return
            except Exception as exc:
                log.exception("postgres write failed; stopping")
                self.on_fatal(exc)
                return
            finally:
                self.writing = False

    async def _write_once(self) -> bool:
        """One transaction of what is ready; False when nothing can be written yet."""
        if not self.ordered:
            items, self.ready = self.ready[: self.max_rows], self.ready[self.max_rows :]
        else:
            flags = self.tracker.in_order(self.ready)
            writable = [i for i, ok in zip(self.ready, flags, strict=True) if ok]
            if not writable:
                return False
            writable.sort(key=lambda i: (i.topic, i.partition, i.offset))
            items = writable[: self.max_rows]
            taken = {id(i) for i in items}
            self.ready = [i for i in self.ready if id(i) not in taken]
        current = [i for i in items if self.tracker.is_current(i)]
        self.release([i for i in items if not self.tracker.is_current(i)])
        if not current:
            return True
        offsets = self.tracker.plan(current)
        changes = [i for i in current if isinstance(i, Change)]
        within: Callable[[Conn], Awaitable[None]] | None = None
        if self.analysis is not None:
            analysed = await self.analysis.run(self.store.run, changes)
            within = partial(
                analysed.apply,
                model=self.model,
                history=self.analysis.history(),
                forgetting=self.analysis.forgetting(),
            )
        plan = None if self.dual is None else self.dual.plan(changes)
        if plan is not None:
            within = plan if within is None else _both(within, plan)
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
        if plan is not None:
            plan.committed()
        self.tracker.complete(current)
        self.release(changes)
        self.stats.transactions += 1
        self.stats.stored += result.upserted
        self.stats.deleted += sum(1 for c in changes if c.op == "delete")
        self.on_stored(offsets)
        return True


def _both(
    first: Callable[[Conn], Awaitable[None]], then: Callable[[Conn], Awaitable[None]]
) -> Callable[[Conn], Awaitable[None]]:
    async def both(conn: Conn) -> None:
        await first(conn)
        await then(conn)

    return both
