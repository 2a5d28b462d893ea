"""The store the pipeline writes through: an interface, and Postgres behind it.

The pipeline's stages take a ``Store`` (tests pass their own), never the pool: what to do
while Postgres is away (wait and retry the whole operation, or give up when stopping) is
decided here once, for the pipeline, the analysis and the side consumers alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

import asyncpg
import structlog

from worker import backoff
from worker.model import Change
from worker.sinks import postgres
from worker.sinks.postgres import Conn, WriteResult

log = structlog.get_logger(__name__)
T = TypeVar("T")
Key = tuple[str, str]


class ShuttingDown(Exception):
    """Postgres is unreachable and a stop was requested: give up waiting, store nothing."""


class RunPg(Protocol):
    """Run a Postgres operation, waiting out outages (``Store.run``)."""

    def __call__(self, what: str, op: Callable[[Conn], Awaitable[T]]) -> Awaitable[T]: ...


class Store(Protocol):
    """What the pipeline needs of its database."""

    @property
    def down(self) -> bool:
        """True while the database is unreachable (for readiness)."""
        ...

    def run(self, what: str, op: Callable[[Conn], Awaitable[T]]) -> Awaitable[T]: ...

    async def load_offsets(self, group_id: str, topic: str) -> dict[int, int]: ...

    async def stored_hashes(
        self, keys: Sequence[Key], model: str, dimension: int, sparse: bool = False
    ) -> dict[Key, bytes]: ...

    async def write(
        self,
        changes: Sequence[Change],
        offsets: dict[tuple[str, int], int],
        group_id: str,
        model: str,
        dimension: int,
        within: Callable[[Conn], Awaitable[None]] | None = None,
    ) -> WriteResult: ...


class PostgresStore:
    """``Store`` over an asyncpg pool.

    Nothing moves while Postgres is away: offsets are only stored by a transaction that
    succeeds, so retrying the whole operation is always safe. Once ``stop`` is set, an
    outage raises ``ShuttingDown`` instead (what was not stored is redone after a restart).
    """

    def __init__(self, pool: asyncpg.Pool, stop: asyncio.Event | None = None) -> None:
        self.pool = pool
        self.stop = stop or asyncio.Event()
        self.down = False

    async def run(self, what: str, op: Callable[[Conn], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                async with self.pool.acquire() as conn:
                    result = await op(conn)
            except postgres.PG_UNAVAILABLE as exc:
                self.down = True
                if self.stop.is_set():
                    raise ShuttingDown(what) from exc
                delay = backoff.capped(attempt, initial=0.1, cap=10.0)
                attempt += 1
                log.warning(
                    "postgres unavailable, retrying", during=what, error=repr(exc), delay_s=delay
                )
                await asyncio.sleep(delay)
                continue
            if self.down:
                log.info("postgres reachable again", during=what)
                self.down = False
            return result

    async def load_offsets(self, group_id: str, topic: str) -> dict[int, int]:
        return await self.run("load offsets", lambda c: postgres.load_offsets(c, group_id, topic))

    async def stored_hashes(
        self, keys: Sequence[Key], model: str, dimension: int, sparse: bool = False
    ) -> dict[Key, bytes]:
        return await self.run(
            "hash lookup",
            lambda c: postgres.stored_hashes(c, list(keys), model, dimension, sparse),
        )

    async def write(
        self,
        changes: Sequence[Change],
        offsets: dict[tuple[str, int], int],
        group_id: str,
        model: str,
        dimension: int,
        within: Callable[[Conn], Awaitable[None]] | None = None,
    ) -> WriteResult:
        return await self.run(
            "write",
            lambda c: postgres.write(
                c, changes, offsets, group_id, model, dimension, within=within
            ),
        )
