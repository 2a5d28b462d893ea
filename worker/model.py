"""One model of an event inside the worker: the Kafka record as read, and the change it became.

Every stage takes and returns these types, so none imports another stage for them. A change
carries its record (key, value, headers, time, topic/partition/offset) to the end, so any
stage that refuses it dead-letters the original bytes, replayable as is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from pgvector import SparseVector

from worker.events import ID_MAX_CHARS, NAMESPACE_MAX_CHARS, TextType
from worker.tokens import estimate_tokens

# (namespace, id) is the primary key: its btree entry must stay well under 2,704 bytes.
MAX_ID_BYTES = 1024
MAX_NAMESPACE_BYTES = 512
# An event without any time orders by offset alone, and a replay of it stays a no-op.
NO_TIME = datetime.fromtimestamp(0, tz=UTC)


@dataclass(frozen=True, slots=True)
class Record:
    """The parts of a Kafka record the worker uses (independent of the client library)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None
    headers: tuple[tuple[str, bytes | None], ...] = ()

    @classmethod
    def of(cls, topic: str, partition: int, msg: Any) -> Record:
        """From an aiokafka ``ConsumerRecord`` (positional: a frozen dataclass takes keywords
        ~0.4 us slower, per record)."""
        headers = tuple(msg.headers or ())
        return cls(topic, partition, msg.offset, msg.key, msg.value, msg.timestamp, headers)


@dataclass(slots=True)
class Change:
    """A valid event on its way to Postgres, with the Kafka record it came from (a later
    stage that refuses it, e.g. the provider, dead-letters that record, replayable as is)."""

    record: Record
    namespace: str
    id: str
    op: Literal["upsert", "delete"]
    event_time: datetime
    text: str = ""
    text_type: TextType = TextType.DOCUMENT
    metadata_json: str = "{}"
    content_hash: bytes = b""
    truncated: bool = False
    tokens: int = 0
    # Filled by the embedder; None for deletes and for unchanged content (vector reused).
    vector: np.ndarray | None = None
    # With provider.output_type = dense&sparse, its sparse (lexical) vector; else None.
    sparse: SparseVector | None = None
    unchanged: bool = False
    # reembed.dual_write: its vectors for re-embed targets (name -> (dense, sparse)), filled
    # beside ``vector`` and written into the targets' tables in the same transaction.
    dual: dict[str, tuple[np.ndarray, SparseVector | None]] | None = None
    epoch: int = 0
    # The event's span (an OpenTelemetry SpanContext) when tracing is on (worker.ops.tracing).
    trace: Any = None
    # oversize_policy = chunk (worker/chunking.py), a document of more than one chunk: the
    # chunks' texts (decode), then the chunks as changes of their own (``pieces``, made when
    # batched) that are embedded like any text; the document reaches the writer once the
    # last of them is embedded (``waiting`` counts down), with ``vector`` its first chunk's.
    chunks: tuple[str, ...] = ()
    pieces: list[Change] | None = None
    waiting: int = 0
    # Refused or dropped after a rebalance: its other chunks are dropped too.
    abandoned: bool = False
    # A chunk: its number and the document it belongs to.
    chunk: int = 0
    document: Change | None = None
    # A multimodal worker's images and video, as sent ((kind, URL or data URI), checked by
    # worker.pipeline.media) and as stored (``media_json``: data URIs by digest, not bytes).
    media: tuple[tuple[str, str], ...] = ()
    media_json: str | None = None

    @property
    def topic(self) -> str:
        return self.record.topic

    @property
    def partition(self) -> int:
        return self.record.partition

    @property
    def offset(self) -> int:
        return self.record.offset

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.id)

    def embeddables(self) -> list[Change]:
        """What must be embedded for this change: itself, or each of its chunks (made here,
        as changes carrying the document's record, epoch and trace)."""
        if not self.chunks:
            return [self]
        if self.pieces is None:
            self.pieces = [
                Change(
                    record=self.record,
                    namespace=self.namespace,
                    id=self.id,
                    op=self.op,
                    event_time=self.event_time,
                    text=text,
                    text_type=self.text_type,
                    tokens=estimate_tokens(text),
                    epoch=self.epoch,
                    trace=self.trace,
                    chunk=number,
                    document=self,
                )
                for number, text in enumerate(self.chunks)
            ]
            self.waiting = len(self.pieces)
        return self.pieces


@dataclass(slots=True)
class Settled:
    """An event with nothing to write (dead-lettered or ignored): only its offset moves on."""

    topic: str
    partition: int
    offset: int
    epoch: int


Item = Change | Settled
"""What the writer receives: rows to apply, or offsets to settle."""


def content_hash(
    text: str,
    text_type: TextType,
    chunking: str = "",
    media: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """What decides "unchanged": the embedded text, how it is embedded (for a chunked
    document, the whole text and the chunk budget, so a new budget splits it anew), and any
    media."""
    tail = f"\x1f{chunking}" if chunking else ""
    digest = hashlib.sha256(f"{text_type.value}\x1f{text}{tail}".encode())
    for kind, reference in media:
        digest.update(f"\x1e{kind}\x1f{reference}".encode())
    return digest.digest()


def identity_problem(namespace: str, id: str) -> str | None:
    """Why (namespace, id) cannot key a row, or None. The one check for upserts, deletes and
    tombstones alike, so an id is accepted or refused the same way whichever way it came."""
    for name, value, max_chars, max_bytes in (
        ("id", id, ID_MAX_CHARS, MAX_ID_BYTES),
        ("namespace", namespace, NAMESPACE_MAX_CHARS, MAX_NAMESPACE_BYTES),
    ):
        if not value:
            return f"the {name} is empty"
        if len(value) > max_chars:
            return f"the {name} is {len(value)} characters; at most {max_chars}"
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            return f"the {name} is {size} bytes as UTF-8; at most {max_bytes}"
    return None
