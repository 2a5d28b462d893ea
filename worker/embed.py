"""Call the provider for one micro-batch: retry what is transient, isolate what is not.

A permanent refusal (HTTP 400) of a batch is split in halves until the refused items are
alone, so one bad text costs a few extra requests instead of failing its batch-mates.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from worker.config import ProviderSettings
from worker.decode import Change
from worker.embedders.base import Embedder, Embeddings, PermanentError, TransientError
from worker.events import TextType

log = structlog.get_logger(__name__)


@dataclass
class BatchOutcome:
    embedded: list[Change] = field(default_factory=list)
    refused: list[tuple[Change, PermanentError]] = field(default_factory=list)
    requests: int = 0
    retries: int = 0


def backoff_delay(attempt: int, initial: float, cap: float, retry_after: float | None) -> float:
    """Full jitter (AWS style), but never sooner than the provider asked for."""
    delay = random.uniform(0, min(cap, initial * 2 ** min(attempt, 62)))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


class EmbedStage:
    def __init__(self, embedder: Embedder, settings: ProviderSettings) -> None:
        self.embedder = embedder
        self.settings = settings

    async def run(self, items: Sequence[Change]) -> BatchOutcome:
        outcome = BatchOutcome()
        await self._embed(list(items), outcome)
        return outcome

    async def _embed(self, items: list[Change], outcome: BatchOutcome) -> None:
        try:
            result = await self._call([c.text for c in items], items[0].text_type, outcome)
        except PermanentError as exc:
            if len(items) == 1:
                outcome.refused.append((items[0], exc))
                return
            middle = len(items) // 2
            log.info("batch refused, splitting", size=len(items), code=exc.code)
            await self._embed(items[:middle], outcome)
            await self._embed(items[middle:], outcome)
            return
        for change, vector in zip(items, result.vectors, strict=True):
            change.vector = vector
        outcome.embedded.extend(items)

    async def _call(
        self, texts: list[str], text_type: TextType, outcome: BatchOutcome
    ) -> Embeddings:
        attempt = 0
        while True:
            outcome.requests += 1
            try:
                return await self.embedder.embed(texts, text_type)
            except TransientError as exc:
                limit = self.settings.max_retries
                if limit is not None and attempt >= limit:
                    raise
                delay = backoff_delay(
                    attempt,
                    self.settings.backoff_initial_s,
                    self.settings.backoff_max_s,
                    exc.retry_after,
                )
                log.warning(
                    "embedding request failed, retrying",
                    cause=exc.code,
                    error=exc.message,
                    attempt=attempt + 1,
                    delay_s=round(delay, 3),
                )
                outcome.retries += 1
                attempt += 1
                await asyncio.sleep(delay)
