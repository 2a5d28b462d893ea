"""Small stand-ins for the consumer, the store and the dead-letter sink around a real Pipeline.

They let a test stage an exact order of fetches, writes and commits (no broker, no database);
each test gives ``FakeStore`` the store operations it watches or holds.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from aiokafka import TopicPartition

from worker.model import Change
from worker.sinks.postgres import Conn, WriteResult

R = TypeVar("R")
Key = tuple[str, str]

T = "ev"
P0, P1 = TopicPartition(T, 0), TopicPartition(T, 1)


class Msg:
    def __init__(self, partition: int, offset: int) -> None:
        self.offset = offset
        self.key = f"id-{partition}-{offset}".encode()
        self.value = json.dumps({"id": f"id-{partition}-{offset}", "text": f"t{offset}"}).encode()
        self.timestamp = 1763632800000 + offset
        self.headers = ()


class FakeConsumer:
    """Hands out the fetches put in ``script``; records Kafka commits (held while
    ``commit_gate`` is clear)."""

    def __init__(self) -> None:
        self.script: asyncio.Queue[dict[TopicPartition, list[Msg]]] = asyncio.Queue()
        self.commits: list[dict[TopicPartition, int]] = []
        self.commit_gate = asyncio.Event()
        self.commit_gate.set()
        self.positions: dict[TopicPartition, int] = {}
        self.timeouts: list[int] = []  # of each getmany

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Msg]]:
        self.timeouts.append(timeout_ms)
        try:
            return await asyncio.wait_for(self.script.get(), timeout_ms / 1000)
        except TimeoutError:
            return {}

    def assignment(self) -> set[TopicPartition]:
        return {P0, P1}

    def pause(self, *tps: TopicPartition) -> None: ...
    def resume(self, *tps: TopicPartition) -> None: ...
    def paused(self) -> set[TopicPartition]:
        return set()

    def highwater(self, tp: TopicPartition) -> None:
        return None

    def last_stable_offset(self, tp: TopicPartition) -> None:
        return None

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    async def seek_to_beginning(self, tp: TopicPartition) -> None:
        self.positions[tp] = 0

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        await self.commit_gate.wait()
        self.commits.append(dict(offsets))


class FakeStore:
    """``worker.sinks.store.Store`` without a database: offsets start empty, no content is
    known, and a write reports its rows stored, unless a test passes its own operation."""

    down = False

    def __init__(
        self,
        load_offsets: Callable[[str, str], Awaitable[dict[int, int]]] | None = None,
        stored_hashes: Callable[[Sequence[Key]], Awaitable[dict[Key, bytes]]] | None = None,
        write: Callable[[Sequence[Change], dict[tuple[str, int], int]], Awaitable[WriteResult]]
        | None = None,
    ) -> None:
        self._load_offsets = load_offsets
        self._stored_hashes = stored_hashes
        self._write = write

    async def run(self, what: str, op: Callable[[Conn], Awaitable[R]]) -> R:
        raise AssertionError(f"no database here ({what})")

    async def load_offsets(self, group_id: str, topic: str) -> dict[int, int]:
        return {} if self._load_offsets is None else await self._load_offsets(group_id, topic)

    async def stored_hashes(
        self, keys: Sequence[Key], model: str, dimension: int, sparse: bool = False
    ) -> dict[Key, bytes]:
        return {} if self._stored_hashes is None else await self._stored_hashes(keys)

    async def write(
        self,
        changes: Sequence[Change],
        offsets: dict[tuple[str, int], int],
        group_id: str,
        model: str,
        dimension: int,
        within: object = None,
    ) -> WriteResult:
        if self._write is None:
            return WriteResult(upserted=len(changes))
        return await self._write(changes, offsets)


class NoDeadLetters:
    async def send(self, letters: object) -> None: ...
