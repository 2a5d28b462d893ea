"""The wire contract: content events in, dead-letter envelopes out."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator


class TextType(StrEnum):
    DOCUMENT = "document"
    QUERY = "query"


class ContentEvent(BaseModel):
    """One content change. The Kafka key is the content id; a null value deletes it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(min_length=1, max_length=512)
    op: Literal["upsert", "delete"] = "upsert"
    text: str | None = None
    namespace: str | None = Field(default=None, min_length=1, max_length=200)
    metadata: dict[str, Any] = Field(default_factory=dict)
    text_type: TextType = TextType.DOCUMENT
    timestamp: AwareDatetime | None = None

    @field_validator("timestamp")
    @classmethod
    def _storable(cls, value: datetime | None) -> datetime | None:
        """Postgres (through asyncpg) takes years 1-9999 in UTC; keep a margin."""
        if value is None:
            return None
        try:
            utc = value.astimezone(UTC)
        except (OverflowError, ValueError):
            raise ValueError("timestamp out of range") from None
        if not 2 <= utc.year <= 9998:
            raise ValueError("timestamp out of range (years 2-9998)")
        return utc

    @field_validator("timestamp", mode="before")
    @classmethod
    def _epoch_ms(cls, value: Any) -> Any:
        """Accept epoch milliseconds (what Kafka producers usually have) as well as ISO-8601."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                return datetime.fromtimestamp(value / 1000, tz=UTC)
            except (OverflowError, OSError, ValueError):
                raise ValueError("timestamp out of range") from None
        return value


class Reason(StrEnum):
    """Machine-readable dead-letter reasons."""

    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    SCHEMA_VIOLATION = "schema_violation"
    KEY_MISMATCH = "key_mismatch"
    EMPTY_TEXT = "empty_text"
    NUL_BYTE = "nul_byte"
    TEXT_TOO_LONG = "text_too_long"
    METADATA_TOO_LARGE = "metadata_too_large"
    PROVIDER_REJECTED = "provider_rejected"


class SourcePosition(BaseModel):
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = None


class DeadLetter(BaseModel):
    """What the dead-letter topic carries: enough to understand, fix and replay the event."""

    reason: Reason
    message: str
    key_b64: str | None
    value_b64: str | None
    # Set when the original value was too large for the dead-letter topic and was cut.
    value_truncated: bool = False
    value_size: int | None = None
    source: SourcePosition
    # Known when the event could be read that far.
    namespace: str | None = None
    id: str | None = None
    provider_code: str | None = None
    failed_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    worker: str = "embedding-worker"
