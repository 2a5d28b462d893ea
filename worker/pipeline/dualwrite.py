"""Dual write (``reembed.dual_write``): each micro-batch is also embedded for the re-embed
targets not yet switched, and written into their tables in the transaction of the worker's
rows and offsets (exactly once, like them), so the switch finds nothing left to embed.

The catch-up stays the guarantee, and the target never holds the worker hostage: a text the
target's provider refuses, a target provider that is down (its breaker open, or no answer
within ``dual_write_timeout_s`` of the batch's start), a vector the guard refuses, a
target's table that refuses the write (dropped, switched): the rows are stored in
``embeddings`` as always, left out of the target (counted, logged) and taken by the next
re-embed pass. Nothing here dead-letters: the event itself is fine.

Each target has its own provider (its stored settings, the current API key) and its own
``EmbedStage``: its limiter, concurrency and breaker are its own, never shared with the
worker's. Targets started, switched or dropped by ``embedding-worker reembed`` are found by
a refresh every ``dual_write_refresh_s``, and at once after a target's write failed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
import structlog
from pydantic import ValidationError

from worker.config import ConfigError, ProviderKind, ProviderSettings, Settings
from worker.embedding.providers import create_embedder
from worker.embedding.providers.base import ConfigurationFault, Embedder
from worker.embedding.stage import EmbedStage, Text
from worker.model import Change
from worker.pipeline.stats import Stats
from worker.sinks import reembed as sql
from worker.sinks.postgres import PG_UNAVAILABLE, Conn, SchemaError, newest_per_key
from worker.sinks.reembed import Dual, Shape, Target
from worker.sinks.store import ShuttingDown, Store
from worker.tokens import estimate_tokens, truncate_to_tokens

log = structlog.get_logger(__name__)


@dataclass
class Active:
    """A target the worker writes: its provider's stage and its statement."""

    target: Target
    stage: EmbedStage
    statement: str
    broken: bool = False  # its write failed: skipped until the next refresh builds it again


def target_provider(target: Target, settings: Settings) -> ProviderSettings:
    """The target's stored provider settings with the current API key (as the re-embed
    builds them); a rejected key stops the target's requests at once instead of holding
    the worker's batches ("exit": the stage raises, the rows go to the catch-up)."""
    key = settings.provider.api_key
    stored = {
        **target.provider,
        "api_key": None if key is None else key.get_secret_value(),
        "on_auth_fault": "exit",
    }
    try:
        return ProviderSettings.model_validate(stored)
    except ValidationError as exc:
        raise ConfigError(f"re-embed {target.name!r}: its stored settings: {exc}") from None


async def started_embedder(target: Target, provider: ProviderSettings) -> Embedder:
    """The target's embedder, started and checked against the target's model and dimension
    before any vector is asked for (closed again when it does not match)."""
    embedder = create_embedder(provider)
    try:
        await embedder.start()
        sql.guard(target, embedder.model, [])
        if embedder.dimension != target.dimension:
            raise ConfigError(
                f"re-embed {target.name!r} is {target.dimension}-d; its provider is "
                f"configured for {embedder.dimension}-d"
            )
    except BaseException:
        await embedder.close()
        raise
    return embedder


def plan_rows(name: str, changes: Sequence[Change]) -> Dual:
    """What a transaction of ``changes`` writes into the target ``name`` (the newest
    version of each key, as the worker's own write takes)."""
    rows = Dual()
    for c in newest_per_key(changes):
        rows.keys.append(c.key)
        if c.op != "upsert":
            continue
        if c.unchanged:
            rows.unchanged.append(c.key)
        elif c.dual is not None and name in c.dual:
            vector, sparse = c.dual[name]
            rows.embedded.append((c.namespace, c.id, c.content_hash, vector, sparse))
    return rows


@dataclass
class Plan:
    """The ``within`` of one transaction: each target's rows, written in a savepoint."""

    dual: DualWrite
    rows: list[tuple[Active, Dual]]
    written: dict[str, int] = field(default_factory=dict)  # of the last attempt

    async def __call__(self, conn: Conn) -> None:
        self.written = {}
        for active, rows in self.rows:
            if not active.broken:
                self.written[active.target.name] = await self.dual.write(conn, active, rows)

    def committed(self) -> None:
        """Count the rows of the attempt that committed."""
        for name, written in self.written.items():
            self.dual.stats.dual_written[name] += written


class DualWrite:
    def __init__(self, settings: Settings, store: Store, stats: Stats) -> None:
        self.settings = settings
        self.store = store
        self.stats = stats
        self.targets: dict[str, Active] = {}
        self._refused: dict[str, str] = {}  # targets not written, and why (logged once)
        self._wake = asyncio.Event()

    # ---- targets ----------------------------------------------------------------------

    async def loop(self) -> None:
        """Refresh the targets now and then (and at once when a write failed)."""
        every = self.settings.reembed.dual_write_refresh_s
        while True:
            try:
                await self.refresh()
            except ShuttingDown:
                return
            except Exception:
                log.exception("dual write: looking for re-embed targets failed; again later")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), every)

    async def refresh(self) -> None:
        found, shape = await self.store.run("re-embed targets", _open_targets)
        resting = set()  # a target whose write failed is built again at the next refresh
        for name, active in list(self.targets.items()):
            now = found.get(name)
            if active.broken or now is None or _settings(now) != _settings((active.target, None)):
                if active.broken:
                    resting.add(name)
                del self.targets[name]
                await active.stage.embedder.close()
                log.info("dual write: target left", target=name, reason=_why_left(active, now))
        for name in list(self._refused):
            if name not in found:
                del self._refused[name]
        for name, (target, problem) in found.items():
            if name in resting:
                continue
            if name in self.targets:
                self.targets[name].statement = sql.dual_statement(shape, target)
                continue
            if problem is None:
                try:
                    self.targets[name] = await self._build(target, shape)
                    self._refused.pop(name, None)
                    log.info(
                        "dual write: writing into the target too",
                        target=name,
                        model=target.model,
                        dimension=target.dimension,
                    )
                    continue
                except ConfigError as exc:
                    problem = str(exc)
            assert problem is not None
            if self._refused.get(name) != problem:
                self._refused[name] = problem
                log.error(
                    "dual write: not writing into this target; its re-embed passes fill it",
                    target=name,
                    error=problem,
                )

    async def _build(self, target: Target, shape: Shape) -> Active:
        if target.provider.get("kind") == ProviderKind.DASHSCOPE_MULTIMODAL.value:
            raise ConfigError(f"re-embed {target.name!r} is multimodal: dual write takes text only")
        provider = target_provider(target, self.settings)
        try:
            embedder = await started_embedder(target, provider)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"re-embed {target.name!r}: its provider: {exc}") from exc
        return Active(target, EmbedStage(embedder, provider), sql.dual_statement(shape, target))

    async def close(self) -> None:
        for active in self.targets.values():
            await active.stage.embedder.close()
        self.targets.clear()

    # ---- embedding (the dispatcher, beside the worker's own request) ------------------

    async def embed(self, batch: Sequence[Change]) -> None:
        """Each target's vectors of the batch's texts, into ``Change.dual``; never raises
        (what fails is left to the catch-up)."""
        active = [a for a in self.targets.values() if not a.broken]
        if active:
            await asyncio.gather(*(self._embed(a, batch) for a in active))

    async def _embed(self, active: Active, batch: Sequence[Change]) -> None:
        name, stage = active.target.name, active.stage
        if stage.breaker.cooling:
            self._left(name, "unavailable", len(batch))
            return
        cap = stage.settings.max_tokens_per_text
        cut = [truncate_to_tokens(c.text, cap) for c in batch]
        texts = [Text(t, c.text_type, estimate_tokens(t)) for t, c in zip(cut, batch, strict=True)]
        try:
            outcome = await asyncio.wait_for(
                stage.run(texts), self.settings.reembed.dual_write_timeout_s
            )
        except TimeoutError:
            log.warning("dual write: the target's provider did not answer in time", target=name)
            self._left(name, "unavailable", len(batch))
            return
        except ConfigurationFault as exc:
            log.error("dual write: the target's provider refuses", target=name, error=exc.message)
            self._left(name, "configuration", len(batch))
            return
        except Exception as exc:
            log.warning("dual write: the target's provider failed", target=name, error=str(exc))
            self._left(name, "unavailable", len(batch))
            return
        self.stats.dual_requests[name] += outcome.requests
        for text, error in outcome.refused:
            log.warning(
                "dual write: a text refused by the target's provider; left to the catch-up",
                target=name,
                error=error.message,
                text=text.text[:80],
            )
        if outcome.refused:
            self._left(name, "refused", len(outcome.refused))
        try:
            sql.guard(active.target, stage.embedder.model, [t.vector for t in outcome.embedded])
        except ConfigError as exc:
            log.error("dual write: vectors refused by the guard", target=name, error=str(exc))
            self._left(name, "guard", len(outcome.embedded))
            return
        for change, text in zip(batch, texts, strict=True):
            if text.vector is not None:
                if change.dual is None:
                    change.dual = {}
                change.dual[name] = (text.vector, text.sparse)

    # ---- writing (the writer, in its transaction) -------------------------------------

    def plan(self, changes: Sequence[Change]) -> Plan | None:
        """The ``within`` of a transaction of ``changes``, or None with no target."""
        active = [a for a in self.targets.values() if not a.broken]
        if not active or not changes:
            return None
        return Plan(self, [(a, plan_rows(a.target.name, changes)) for a in active])

    async def write(self, conn: Conn, active: Active, rows: Dual) -> int:
        """One target's rows in a savepoint: a failure (its table dropped or switched
        meanwhile, another dimension) rolls back only them, and the target is left until
        the next refresh, which is woken. An outage is the transaction's, raised."""
        name = active.target.name
        try:
            async with conn.transaction():
                return await sql.write_dual(conn, active.statement, active.target, rows)
        except PG_UNAVAILABLE:
            raise
        except asyncpg.PostgresError as exc:
            log.warning(
                "dual write: the target's table refused the rows; left to the catch-up",
                target=name,
                error=str(exc),
            )
            active.broken = True
            self._wake.set()
            self._left(name, "write", len(rows.embedded))
            return 0

    def _left(self, name: str, reason: str, rows: int) -> None:
        self.stats.dual_left[(name, reason)] += rows


async def _open_targets(conn: Conn) -> tuple[dict[str, tuple[Target, str | None]], Shape]:
    """The targets being filled, each with why it cannot be written (its table missing or
    of another dimension), and the shape of ``embeddings``."""
    shape = await sql.shape(conn)
    if await conn.fetchval("SELECT to_regclass('reembed_targets')") is None:
        return {}, shape  # before migration 0011
    found: dict[str, tuple[Target, str | None]] = {}
    for target in await sql.all_targets(conn):
        if target.state != "filling":
            continue
        problem = None
        try:
            await sql.check_table(conn, target)
        except SchemaError as exc:
            problem = str(exc)
        found[target.name] = (target, problem)
    return found, shape


def _settings(found: tuple[Target, str | None]) -> tuple[object, ...]:
    target, problem = found
    return (target.provider, target.model, target.dimension, problem)


def _why_left(active: Active, now: tuple[Target, str | None] | None) -> str:
    if active.broken:
        return "its write failed"
    return "switched or dropped" if now is None else "its settings or its table changed"
