"""Build the worker's internal objects directly, for tests of single stages."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fakeapi import FakeEmbeddingServer
from tests.conftest import dashscope
from worker.config import load_settings
from worker.embedding.providers import create_embedder
from worker.embedding.stage import EmbedStage
from worker.events import TextType
from worker.model import Change, Record
from worker.tokens import estimate_tokens


def upsert(
    offset: int,
    text: str,
    id: str | None = None,
    text_type: TextType = TextType.DOCUMENT,
    tokens: int | None = None,
) -> Change:
    """An upsert as decode would produce it (tokens estimated unless given)."""
    return Change(
        record=Record("t", 0, offset, None, None),
        namespace="ns",
        id=id or f"doc-{offset}",
        op="upsert",
        event_time=datetime.now(UTC),
        text=text,
        text_type=text_type,
        tokens=estimate_tokens(text) if tokens is None else tokens,
    )


@contextlib.asynccontextmanager
async def stage_for(
    fake: FakeEmbeddingServer, dimension: int, **provider: Any
) -> AsyncIterator[EmbedStage]:
    """An embed stage against the fake DashScope API, closed afterwards."""
    settings = load_settings(provider=dashscope(fake, dimension, **provider))
    embedder = create_embedder(settings.provider)
    try:
        yield EmbedStage(embedder, settings.provider)
    finally:
        await embedder.close()
