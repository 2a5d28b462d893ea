"""A worker process on its own topic and database, watched from outside (scenarios 3, 4, 6, 7).

:class:`LiveWorker` creates a fresh database, starts ``python -m worker run`` on a topic, and
polls the offsets the worker stores in Postgres (with the vectors, in one transaction), so
every figure counts only what is durable. ``samples`` keeps ``(wall time, stored events)``
for the rate and latency calculations; ``rss`` the worker's resident memory when asked.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks.context import Context
from benchmarks.harness import (
    CpuWindow,
    FakeProvider,
    Subprocess,
    drop_database,
    fresh_database,
    stack_roots,
    unique,
)
from benchmarks.overhead import worker_config
from worker.config import environment_for
from worker.sinks import postgres as store


def rss_mb(pid: int) -> float:
    """Resident memory of one process (MB), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass
class LiveWorker:
    ctx: Context
    topic: str
    label: str
    dimension: int
    config: dict[str, Any]
    fake: FakeProvider | None = None
    proc: Subprocess | None = None
    dsn: str = ""
    name: str = ""
    conn: asyncpg.Connection | None = None
    samples: list[tuple[float, int]] = field(default_factory=list)

    @classmethod
    async def start(
        cls,
        ctx: Context,
        topic: str,
        label: str,
        dimension: int,
        fake: FakeProvider | None = None,
        overrides: dict[str, dict[str, Any]] | None = None,
        provider: dict[str, Any] | None = None,
    ) -> LiveWorker:
        """``provider`` replaces the provider section (e.g. the local model)."""
        name = unique(f"bench_{label}")
        dsn = await fresh_database(ctx.stack, name, dimension)
        config = worker_config(ctx, topic, dsn, name, fake, overrides)
        if provider is not None:
            config["provider"] = provider
        # The fake that serves this worker (the shared one unless given), for its CPU.
        serving = None if provider is not None else fake or ctx.fake
        self = cls(ctx, topic, label, dimension, config, serving, dsn=dsn, name=name)
        self.conn = await asyncpg.connect(dsn)
        env = environment_for(config)
        log_path = ctx.work / f"{name}.log"
        self.proc = await Subprocess(["-m", "worker", "run"], env, log_path).start()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_window(self) -> CpuWindow:
        roots = {"worker": self.pid, **stack_roots(self.ctx.stack)}
        if self.fake is not None:
            roots["fake-provider"] = self.fake.pid
        roots["harness"] = os.getpid()
        return CpuWindow(roots)

    async def stored(self) -> int:
        assert self.conn is not None
        return sum((await store.load_offsets(self.conn, self.name, self.topic)).values())

    async def poll(self) -> int:
        n = await self.stored()
        self.samples.append((time.time(), n))
        if self.proc is not None and self.proc.exited():
            raise RuntimeError(f"the worker exited early; see {self.proc.log_path}")
        return n

    async def wait_for(self, total: int, timeout_s: float, every_s: float = 0.02) -> None:
        deadline = time.monotonic() + timeout_s
        while await self.poll() < total:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.label}: only {self.samples[-1][1]}/{total} stored in {timeout_s} s"
                )
            await asyncio.sleep(every_s)

    def crossing(self, n: int) -> float:
        """Wall time of the first sample with at least ``n`` events stored."""
        for t, stored in self.samples:
            if stored >= n:
                return t
        raise ValueError(f"never reached {n}")

    def rate_between(self, lo: int, hi: int) -> float:
        """Events per second between the samples that first reached ``lo`` and ``hi``; when one
        sample reached both (tiny runs), from the sample before it."""
        i_lo = next(i for i, (_, n) in enumerate(self.samples) if n >= lo)
        i_hi = next(i for i, (_, n) in enumerate(self.samples) if n >= hi)
        if i_hi == i_lo:
            i_lo = max(0, i_lo - 1)
        (t0, n0), (t1, n1) = self.samples[i_lo], self.samples[i_hi]
        return (n1 - n0) / max(t1 - t0, 1e-9)

    async def rows(self) -> int:
        assert self.conn is not None
        return int(await self.conn.fetchval("SELECT count(*) FROM embeddings"))

    async def stop(self, kill: bool = False) -> int:
        """SIGTERM and wait for the graceful stop, or SIGKILL (``kill``); drops the database."""
        code = -1
        try:
            if self.proc is not None and self.proc.proc is not None and kill:
                self.proc.proc.kill()
                code = await self.proc.proc.wait()
            elif self.proc is not None:
                code = await self.proc.terminate()
        finally:
            if self.conn is not None:
                await self.conn.close()
            await drop_database(self.ctx.stack, self.name)
        return code
