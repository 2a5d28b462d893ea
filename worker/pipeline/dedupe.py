"""Dedupe: an upsert whose content is already embedded skips the API.

The stored content hash is trusted only when no earlier event for the same key is in
flight (that event may change what is stored), so the keys in flight are counted here,
from decode until the writer (or a refusal) releases them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from worker.model import Change, Item
from worker.pipeline.stats import Stats
from worker.sinks.store import Store


class Dedupe:
    def __init__(
        self, store: Store, model: str, dimension: int, stats: Stats, sparse: bool = False
    ) -> None:
        self.store = store
        self.model = model
        self.dimension = dimension
        self.sparse = sparse  # only rows with a sparse vector count as embedded
        self.stats = stats
        self._in_flight: Counter[tuple[str, str]] = Counter()

    async def route(self, changes: list[Change]) -> tuple[list[Change], list[Change]]:
        """(what goes straight to the writer: deletes and unchanged content, what must be
        embedded), each in the order received; one hash lookup for the whole fetch."""
        lookup: list[Change] = []
        for change in changes:
            if change.op == "upsert" and not self._in_flight[change.key]:
                lookup.append(change)
            self._in_flight[change.key] += 1
        known: dict[tuple[str, str], bytes] = {}
        if lookup:
            known = await self.store.stored_hashes(
                [c.key for c in lookup], self.model, self.dimension, self.sparse
            )
        trusted = {id(c) for c in lookup}
        direct: list[Change] = []
        embed: list[Change] = []
        for change in changes:
            if change.op == "delete":
                direct.append(change)
            elif id(change) in trusted and known.get(change.key) == change.content_hash:
                change.unchanged = True
                self.stats.unchanged += 1
                direct.append(change)
            else:
                embed.append(change)
        return direct, embed

    def release(self, items: Sequence[Item]) -> None:
        """These events are done with (stored, refused or dropped after a rebalance)."""
        for item in items:
            if isinstance(item, Change):
                self._in_flight[item.key] -= 1
                if self._in_flight[item.key] <= 0:
                    del self._in_flight[item.key]
