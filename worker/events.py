"""The wire contract: content events in, dead-letter envelopes out."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
)


class TextType(StrEnum):
    DOCUMENT = "document"
    QUERY = "query"


# Limits of (namespace, id), checked by ``worker.pipeline.decode.identity_problem`` for upserts,
# deletes and tombstones alike (with byte limits that keep the primary key's btree entry small).
ID_MAX_CHARS = 512
NAMESPACE_MAX_CHARS = 200


def _epoch_ms(value: Any) -> Any:
    """Accept epoch milliseconds (what Kafka producers usually have) as well as ISO-8601."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value / 1000, tz=UTC)
        except (OverflowError, OSError, ValueError):
            raise ValueError("out of range") from None
    return value


def _storable(value: datetime) -> datetime:
    """Postgres (through asyncpg) takes years 1-9999 in UTC; keep a margin."""
    try:
        utc = value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValueError("out of range") from None
    if not 2 <= utc.year <= 9998:
        raise ValueError("out of range (years 2-9998)")
    return utc


# A time an event carries: ISO-8601 with a zone or epoch milliseconds, stored in UTC.
EventTime = Annotated[AwareDatetime, BeforeValidator(_epoch_ms), AfterValidator(_storable)]


class ContentEvent(BaseModel):
    """One content change. The Kafka key is the content id; a null value deletes it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    op: Literal["upsert", "delete"] = "upsert"
    text: str | None = None
    namespace: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    text_type: TextType = TextType.DOCUMENT
    timestamp: EventTime | None = None
    # For a multimodal worker (docs/multimodal.md): http(s) URLs or base64 data URIs of
    # JPG/PNG/BMP images, and the URL of one video. A text worker embeds the text only.
    images: list[str] = Field(default_factory=list)
    video: str | None = None


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
    TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"
    UNREADABLE_RECORD = "unreadable_record"
    # Schema-registry formats: not the wire format, or bytes that do not fit their schema.
    SCHEMA_MISMATCH = "schema_mismatch"
    # Moderation decisions (worker/analysis/decisions.py).
    UNKNOWN_ID = "unknown_id"
    NO_CONTENT = "no_content"
    UNKNOWN_NAMESPACE = "unknown_namespace"
    UNKNOWN_LABEL = "unknown_label"
    # Multimodal events (worker/pipeline/media.py), refused before any request: an image
    # (decoded data URI) over the model's size limit; not JPG/PNG/BMP; more images than the
    # model takes in one request; a reference that is neither an http(s) URL nor a base64
    # data URI (a video must be a URL).
    MEDIA_TOO_LARGE = "media_too_large"
    MEDIA_UNSUPPORTED_FORMAT = "media_unsupported_format"
    TOO_MANY_IMAGES = "too_many_images"
    MEDIA_INVALID = "media_invalid"


class SourcePosition(BaseModel):
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = None


class HeaderCopy(BaseModel):
    key: str
    value_b64: str | None


class DeadLetter(BaseModel):
    """What the dead-letter topic carries: enough to understand, fix and replay the event.

    The copies of the original key, value and headers share the topic's size budget
    (``worker.envelope``): a part that did not fit is cut to a prefix (``*_truncated``), and
    every part keeps its size and SHA-256, so replay can fetch the original from ``source``.
    """

    reason: Reason
    message: str
    key_b64: str | None
    value_b64: str | None
    headers: list[HeaderCopy] = Field(default_factory=list)
    key_truncated: bool = False
    value_truncated: bool = False
    headers_truncated: bool = False
    # The original parts: bytes and SHA-256 (hex); None where the record had no key / value.
    # headers_size is None in letters written before headers were kept.
    key_size: int | None = None
    key_sha256: str | None = None
    value_size: int | None = None
    value_sha256: str | None = None
    headers_size: int | None = None
    headers_sha256: str | None = None
    source: SourcePosition
    # Known when the event could be read that far.
    namespace: str | None = None
    id: str | None = None
    provider_code: str | None = None
    failed_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    worker: str = "embedding-worker"
    # The event's span when tracing is on (worker.ops.tracing): the letter's headers carry it.
    _trace: Any = PrivateAttr(default=None)

    @property
    def cut(self) -> bool:
        """Some copy is not whole: the original must be read again from ``source``."""
        return self.key_truncated or self.value_truncated or self.headers_truncated

    def stripped(self) -> DeadLetter:
        """No copies, only the source position, sizes and hashes: always small."""
        return self.model_copy(
            update={
                "key_b64": None if self.key_b64 is None else "",
                "value_b64": None if self.value_b64 is None else "",
                "headers": [],
                "key_truncated": self.key_truncated or bool(self.key_size),
                "value_truncated": self.value_truncated or bool(self.value_size),
                "headers_truncated": self.headers_truncated or bool(self.headers),
            }
        )
