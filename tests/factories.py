"""Build the worker's internal objects directly, for tests of single stages."""

from __future__ import annotations

from datetime import UTC, datetime

from worker.decode import Change
from worker.events import TextType
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
        topic="t",
        partition=0,
        offset=offset,
        namespace="ns",
        id=id or f"doc-{offset}",
        op="upsert",
        event_time=datetime.now(UTC),
        text=text,
        text_type=text_type,
        tokens=estimate_tokens(text) if tokens is None else tokens,
    )
