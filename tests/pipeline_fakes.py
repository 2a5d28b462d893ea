"""Small stand-ins for the consumer, Postgres pool and dead-letter sink around a real Pipeline.

They let a test stage an exact order of fetches, writes and commits (no broker, no database);
``store`` functions are replaced by each test with monkeypatch.
"""

from __future__ import annotations

import asyncio
import json

from aiokafka import TopicPartition

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

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Msg]]:
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


class FakePool:
    class _Conn:
        async def __aenter__(self) -> None:
            return None

        async def __aexit__(self, *exc: object) -> bool:
            return False

    def acquire(self) -> _Conn:
        return self._Conn()


class NoDeadLetters:
    async def send(self, letters: object) -> None: ...
