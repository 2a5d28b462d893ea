"""Shared machinery of the benchmarks: the stack, the fake provider, events, CPU sampling.

Every scenario returns :class:`Figure` objects: one measured quantity, its value in each run,
the limit it is measured against (so the report can show a ratio), and the CPU each process
used while it was measured (percent of one core; this machine has ``os.cpu_count()`` cores).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from worker.sinks.migrate import migrate
from worker.tools.devstack import DevStack

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "worker" / "data" / "sample_events.jsonl"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- results


@dataclass
class Figure:
    """One measured quantity over several runs."""

    scenario: str
    name: str
    unit: str
    runs: list[float]
    # What the figure is compared against: ``ratio = median / limit`` (None: no target).
    limit: float | None = None
    limit_label: str = ""
    higher_is_better: bool = True
    # False: the limit is a reference (e.g. a capacity), not a target: no ✅/❌.
    judged: bool = True
    notes: str = ""
    # Median CPU per process over the runs, percent of one core.
    cpu: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return float(statistics.median(self.runs)) if self.runs else float("nan")

    @property
    def ratio(self) -> float | None:
        if self.limit is None or not self.limit or not self.runs:
            return None
        return self.median / self.limit

    @property
    def meets(self) -> bool | None:
        if self.limit is None or not self.runs or not self.judged:
            return None
        if self.higher_is_better:
            return self.median >= self.limit
        return self.median <= self.limit

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "name": self.name,
            "unit": self.unit,
            "runs": [round(v, 4) for v in self.runs],
            "median": round(self.median, 4),
            "min": round(min(self.runs), 4) if self.runs else None,
            "max": round(max(self.runs), 4) if self.runs else None,
            "limit": self.limit,
            "limit_label": self.limit_label,
            "ratio": None if self.ratio is None else round(self.ratio, 4),
            "meets_limit": self.meets,
            "cpu_percent_of_one_core": {k: round(v, 1) for k, v in self.cpu.items()},
            "notes": self.notes,
            **({"extra": self.extra} if self.extra else {}),
        }


def median_cpu(samples: list[dict[str, float]]) -> dict[str, float]:
    names = sorted({k for s in samples for k in s})
    return {n: float(statistics.median([s.get(n, 0.0) for s in samples])) for n in names}


# --------------------------------------------------------------------------- CPU


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime + stime in ticks) for every process we can read."""
    out: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ')'.
        fields = raw[raw.rfind(")") + 2 :].split()
        out[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return out


def _tree(table: dict[int, tuple[int, int]], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    seen, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo += children.get(pid, [])
    return seen


class CpuWindow:
    """CPU time of named process trees between ``start()`` and ``stop()``.

    A tree is a root pid and all its descendants (Postgres backends are children of the
    postmaster). Processes that appear during the window count in full, processes that exit
    during it are lost (the harness keeps its processes alive across a window).
    """

    def __init__(self, roots: dict[str, int], single: Iterable[str] = ("harness",)) -> None:
        self.roots = roots
        # Names counted as one process, not a tree (the harness is the stack's parent).
        self.single = {name for name in roots if name.startswith(tuple(single))}
        self._start: dict[str, dict[int, int]] = {}
        self._psi: int | None = None
        self._t0 = 0.0

    def _snapshot(self) -> dict[str, dict[int, int]]:
        table = _proc_table()
        return {
            name: {
                pid: table[pid][1]
                for pid in ({root} if name in self.single else _tree(table, root))
                if pid in table
            }
            for name, root in self.roots.items()
        }

    def start(self) -> None:
        self._start = self._snapshot()
        self._psi = _cpu_pressure_us()
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        end = self._snapshot()
        wall = max(time.monotonic() - self._t0, 1e-9)
        out: dict[str, float] = {}
        for name, pids in end.items():
            before = self._start.get(name, {})
            ticks = sum(t - before.get(pid, 0) for pid, t in pids.items())
            out[name] = 100.0 * ticks / CLOCK_TICKS / wall
        psi = _cpu_pressure_us()
        if psi is not None and self._psi is not None:
            # Share of the window in which some runnable task waited for a CPU (the
            # machine is shared: high values mean the figure is contention-bound).
            out[PRESSURE] = 100.0 * (psi - self._psi) / 1e6 / wall
        return out


PRESSURE = "(cpu-pressure)"


def _cpu_pressure_us() -> int | None:
    """Linux PSI: total microseconds during which some task waited for a CPU."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return int(first.rsplit("total=", 1)[1])


# --------------------------------------------------------------------------- processes


class FakeProvider:
    """``python -m fakeapi`` as a subprocess (so its CPU is its own), answering instantly."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""

    async def start(self) -> FakeProvider:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fakeapi",
            "--port",
            "0",
            "--no-auth",
            *self.args,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        self.url = line.decode().strip()
        if not self.url.startswith("http"):
            raise RuntimeError(f"fakeapi did not start: {line!r}")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def openai_url(self) -> str:
        return self.url + "/v1"

    async def stats(self) -> dict[str, Any]:
        """The fake's counters (``GET /_fake/stats``; see fakeapi.stats.FakeStats)."""
        import httpx

        async with httpx.AsyncClient(base_url=self.url) as client:
            response = await client.get("/_fake/stats")
            response.raise_for_status()
            data: dict[str, Any] = response.json()
            return data

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.proc.wait(), 10)


class Subprocess:
    """A Python module run as a child process with extra environment; output to a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args = args
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EMBEDDING_WORKER_")},
            **env,
        }
        self.log_path = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> Subprocess:
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, *self.args, cwd=ROOT, env=self.env, stdout=log, stderr=log
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def exited(self) -> bool:
        return self.proc is not None and self.proc.returncode is not None

    async def terminate(self, within_s: float = 60) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return await asyncio.wait_for(self.proc.wait(), within_s)
            except TimeoutError:
                self.proc.kill()
                return await self.proc.wait()
        return self.proc.returncode


def postmaster_pid(stack: DevStack) -> int:
    pgdata = Path(str(stack.postgres.pgdata))
    return int((pgdata / "postmaster.pid").read_text().split()[0])


def stack_roots(stack: DevStack) -> dict[str, int]:
    """The stack's processes by name: ``broker`` (or ``broker-1``.. for a cluster's nodes,
    each its own JVM) and ``postgres``."""
    pids = stack.broker.pids()
    brokers = (
        {"broker": pids[0]} if len(pids) == 1 else {f"broker-{i}": p for i, p in enumerate(pids, 1)}
    )
    return {**brokers, "postgres": postmaster_pid(stack)}


# --------------------------------------------------------------------------- data


def sample_texts() -> list[tuple[str, dict[str, Any]]]:
    """The demo's real multilingual texts (upserts only) with their metadata."""
    out = []
    for line in SAMPLE.read_text("utf-8").splitlines():
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if not isinstance(data, dict) or data.get("op", "upsert") != "upsert":
            continue
        text = data.get("text")
        if isinstance(text, str) and text.strip() and "\x00" not in text:
            metadata = data.get("metadata")
            out.append((text, metadata if isinstance(metadata, dict) else {}))
    return out


def events(n: int, prefix: str = "bench") -> Iterator[tuple[bytes, bytes]]:
    """``n`` distinct upserts (key, value): real texts, each made unique by a suffix."""
    texts = sample_texts()
    for i in range(n):
        text, metadata = texts[i % len(texts)]
        doc_id = f"{prefix}-{i:07d}"
        value = {
            "id": doc_id,
            "op": "upsert",
            "namespace": "bench",
            "text": f"{text} [{i}]",
            "metadata": metadata,
        }
        yield doc_id.encode(), json.dumps(value, ensure_ascii=False).encode()


async def produce(stack: DevStack, topic: str, records: Iterable[tuple[bytes, bytes]]) -> int:
    """Produce and wait for every acknowledgement; returns the count."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, acks="all", linger_ms=20)
    await producer.start()
    try:
        futures = [await producer.send(topic, key=k, value=v) for k, v in records]
        await asyncio.gather(*futures)
        return len(futures)
    finally:
        await producer.stop()


def unique(name: str) -> str:
    return f"{name}_{uuid.uuid4().hex[:8]}"


async def fresh_database(stack: DevStack, name: str, dimension: int) -> str:
    dsn = await stack.create_database(name)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, dimension)
    finally:
        await conn.close()
    return dsn


async def drop_database(stack: DevStack, name: str) -> None:
    conn = await asyncpg.connect(stack.admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
