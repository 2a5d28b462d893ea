"""Decode: turn each Kafka record into a change to apply, or a dead letter with its reason.

Every check that depends only on the record happens here, before any API call, so bad input
never costs a request and never reaches Postgres (which cannot store NUL characters).
``decode`` reads one record; ``Decoder`` a whole fetch, tracking offsets as it goes.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

from worker.chunking import split
from worker.config import (
    REGISTRY_FORMATS,
    InputFormat,
    InputSettings,
    OversizePolicy,
    ProviderKind,
    Settings,
)
from worker.envelope import DEFAULT_MAX_MESSAGE_BYTES, envelope_budget, read_or_letter
from worker.events import (
    ContentEvent,
    DeadLetter,
    Reason,
)
from worker.jsonvalue import Rejected, check_strings, describe, json_object
from worker.kafka.unreadable import Unreadable
from worker.model import NO_TIME, Change, Record, Settled, content_hash, identity_problem
from worker.pipeline.fetch import Fetched
from worker.pipeline.formats import Ignored, is_native, to_event, tombstone
from worker.pipeline.media import MediaLimits, checked_media
from worker.pipeline.offsets import TP, OffsetTracker
from worker.pipeline.registry import Schemas, jsonable
from worker.pipeline.stats import Stats
from worker.tokens import estimate_tokens, truncate_to_tokens

if TYPE_CHECKING:
    from worker.ops.tracing import Tracing

NAMESPACE_HEADER = "namespace"


@dataclass(frozen=True, slots=True)
class Limits:
    default_namespace: str
    max_tokens_per_text: int
    oversize_policy: OversizePolicy
    max_metadata_bytes: int
    # oversize_policy = chunk: the chunk budget and overlap (settings.chunking).
    chunk_tokens: int = 256
    chunk_overlap_tokens: int = 32
    # How far a version's time may run ahead of the record's own time (or the worker's clock).
    max_clock_skew_s: float = 300.0
    # What a dead letter's JSON may take (see worker.envelope).
    dead_letter_bytes: int = envelope_budget(DEFAULT_MAX_MESSAGE_BYTES)
    # The input topic's shape (worker.pipeline.formats): the native contract unless configured.
    input: InputSettings = field(default_factory=InputSettings)
    # The schemas of a schema-registry format (the pipeline fetches them before decoding).
    schemas: Schemas | None = field(default=None, compare=False)
    # A multimodal worker's model (images and video checked against it); None: text only.
    media: MediaLimits | None = None
    # The native contract with its own field names (no mapping): known once, not per record.
    native: bool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "native", is_native(self.input))

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        """The limits a worker with ``settings`` decodes with (``produce`` checks files alike)."""
        return cls(
            default_namespace=settings.default_namespace,
            max_tokens_per_text=settings.provider.max_tokens_per_text,
            oversize_policy=settings.oversize_policy,
            max_metadata_bytes=settings.max_metadata_bytes,
            chunk_tokens=settings.chunking.max_tokens,
            chunk_overlap_tokens=settings.chunking.overlap_tokens,
            max_clock_skew_s=settings.max_clock_skew_s,
            dead_letter_bytes=envelope_budget(settings.kafka.dlq_max_message_bytes),
            input=settings.input,
            schemas=Schemas(settings.input) if settings.input.format in REGISTRY_FORMATS else None,
            media=MediaLimits.of(settings.provider.model_name)
            if settings.provider.kind is ProviderKind.DASHSCOPE_MULTIMODAL
            else None,
        )


def decode(record: Record, limits: Limits) -> Change | DeadLetter | Ignored:
    """Never raises: whatever the bytes, the answer is a change, a dead letter, or (for a
    record that asks for nothing, such as a Debezium tombstone) ``Ignored``."""
    return read_or_letter(
        record, "the event", limits.dead_letter_bytes, lambda: _decode(record, limits)
    )


def _record_time(record: Record) -> datetime:
    if record.timestamp_ms is not None and record.timestamp_ms >= 0:
        return _time_of(record.timestamp_ms)
    return NO_TIME


@functools.lru_cache(maxsize=1024)
def _time_of(ms: int) -> datetime:
    """A record time as a datetime, made once per millisecond: a fetch's records share a few
    (a producer stamps a whole batch within a millisecond or so). Building them, twice per
    event then, was 3.4 % of py-spy's samples of the worker in benchmark scenario 1."""
    try:
        return datetime.fromtimestamp(ms / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return NO_TIME


def _check_identity(namespace: str, id: str) -> None:
    problem = identity_problem(namespace, id)
    if problem is not None:
        raise Rejected(Reason.SCHEMA_VIOLATION, problem)


def _check_time(
    version_time: datetime, record: Record, limits: Limits, *, own: bool = False
) -> None:
    """A version stamped far ahead would make every later upsert and delete of its id a
    no-op (versions order by time): refuse it. The reference is the record's own time, so
    that the answer does not change when the record is read again later, but never later
    than the worker's clock (a producer's clock can be wrong too). ``own``: the version time
    is the record's own time (the event carries none)."""
    if version_time == NO_TIME or _well_within_skew(version_time, record, limits, own):
        return
    now = datetime.now(UTC)
    record_time = _record_time(record)
    reference = now if record_time == NO_TIME else min(record_time, now)
    ahead = (version_time - reference).total_seconds()
    if ahead > limits.max_clock_skew_s:
        against = "the worker's clock" if reference is now else "the record's own time"
        raise Rejected(
            Reason.TIMESTAMP_OUT_OF_RANGE,
            f"the version time {version_time.isoformat()} is {ahead:.0f} s ahead of {against} "
            f"({reference.isoformat()}); at most {limits.max_clock_skew_s:g} s "
            "(max_clock_skew_s) is accepted, or it would hide every later version of this id",
        )


def _well_within_skew(version_time: datetime, record: Record, limits: Limits, own: bool) -> bool:
    """``_check_time``'s test in float seconds, without building datetimes per event (the
    clock's, the record's): True only where the exact test passes too (a millisecond on the
    safe side of float rounding); near or past the limit, the exact test decides and words
    the letter. A record time of 0 or less is none (as in ``_record_time``); one past
    datetime's range is later than the clock, so the reference is the clock either way."""
    ms = record.timestamp_ms
    now = time.time()
    margin = limits.max_clock_skew_s - 0.001
    if ms is None or ms <= 0:
        return version_time.timestamp() - now <= margin
    if own:  # ahead of the reference min(own, now) only by how far it is ahead of the clock
        return ms / 1000 - now <= margin
    return version_time.timestamp() - min(ms / 1000, now) <= margin


def _short(text: str, width: int = 80) -> str:
    return repr(text) if len(text) <= width else repr(text[:width]) + f"... ({len(text)} chars)"


def _key(record: Record) -> str | None:
    if record.key is None:
        return None
    try:
        return record.key.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected(Reason.INVALID_UTF8, "the record key is not valid UTF-8") from None


def _decode(record: Record, limits: Limits) -> Change | Ignored:
    key = _key(record)
    native = limits.native
    if record.value is None:
        return (None if native else tombstone(limits.input)) or _tombstone(record, key, limits)
    if limits.schemas is None:
        data = json_object(record.value, "the value")
    else:
        data = limits.schemas.decode(record.value)
    if not native:
        data = to_event(limits.input, data, record.headers)
        if limits.schemas is not None:  # Avro's dates, decimals and bytes are not JSON
            data["metadata"] = jsonable(data["metadata"])
        # The key is the producer's partition key (Debezium: the row's primary key; the
        # CloudEvents binding: `partitionkey`), not necessarily the content id.
        key = None if limits.input.format is not InputFormat.NATIVE else key
    try:
        event = ContentEvent.model_validate(data)
    except ValidationError as exc:
        raise Rejected(Reason.SCHEMA_VIOLATION, describe(exc)) from None
    namespace = limits.default_namespace if event.namespace is None else event.namespace
    try:
        return _checked(record, key, namespace, event, limits)
    except Rejected as exc:
        if identity_problem(namespace, event.id) is None:  # the letter names valid ids only
            exc.namespace, exc.id = namespace, event.id
        raise


def _checked(
    record: Record, key: str | None, namespace: str, event: ContentEvent, limits: Limits
) -> Change | Ignored:
    _check_identity(namespace, event.id)
    if key is not None and key != event.id:
        raise Rejected(
            Reason.KEY_MISMATCH,
            f"the record key {_short(key)} differs from the event id {_short(event.id)} "
            "(the key must be the content id so that one id stays in one partition)",
        )
    change = Change(
        record=record,
        namespace=namespace,
        id=event.id,
        op=event.op,
        event_time=event.timestamp or _record_time(record),
    )
    _check_time(change.event_time, record, limits, own=event.timestamp is None)
    if event.op == "delete":
        return change
    if event.images or event.video is not None:
        return _with_media(change, event, limits)
    return _with_text(change, event, limits)


def _with_media(change: Change, event: ContentEvent, limits: Limits) -> Change | Ignored:
    """An event with images or a video. A multimodal worker checks them against its model's
    limits and embeds them with the text, if any; a text worker embeds the text alone and
    settles a media-only event (it is the multimodal deployment's, docs/multimodal.md)."""
    if limits.media is None:
        if event.text is None or not event.text.strip():
            return Ignored()
        return _with_text(change, event, limits)
    media, media_json = checked_media(event.images, event.video, limits.media)
    if event.text is None or not event.text.strip():
        encoded = _metadata_json(event.metadata)
        if len(encoded) > limits.max_metadata_bytes:
            raise Rejected(
                Reason.METADATA_TOO_LARGE,
                f"metadata is {len(encoded)} bytes as JSON; the limit is "
                f"{limits.max_metadata_bytes}",
            )
        change.metadata_json = encoded.decode("utf-8")
        change.text_type = event.text_type
    else:
        change = _with_text(change, event, limits)
    change.media, change.media_json = media, media_json
    change.content_hash = content_hash(change.text, change.text_type, media=media)
    return change


def _tombstone(record: Record, key: str | None, limits: Limits) -> Change:
    if key is None:
        raise Rejected(Reason.SCHEMA_VIOLATION, "a tombstone (null value) needs the id as key")
    check_strings(key, "key")
    namespace = limits.default_namespace
    for name, value in record.headers:
        if name == NAMESPACE_HEADER:
            if value is None:
                raise Rejected(Reason.SCHEMA_VIOLATION, "the namespace header is null")
            try:
                namespace = value.decode("utf-8")
            except UnicodeDecodeError:
                raise Rejected(Reason.INVALID_UTF8, "the namespace header is not UTF-8") from None
            check_strings(namespace, "namespace header")
    _check_identity(namespace, key)
    change = Change(
        record=record, namespace=namespace, id=key, op="delete", event_time=_record_time(record)
    )
    try:
        _check_time(change.event_time, record, limits, own=True)
    except Rejected as exc:
        exc.namespace, exc.id = namespace, key
        raise
    return change


def _metadata_json(metadata: Any) -> bytes:
    """Compact UTF-8 JSON; orjson unless a value is out of its range (an integer past 64 bits,
    which JSON and jsonb keep exactly). Non-finite numbers never get here (refused when
    parsed)."""
    try:
        return orjson.dumps(metadata)
    except orjson.JSONEncodeError:
        text = json.dumps(metadata, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return text.encode("utf-8")


def _with_text(change: Change, event: ContentEvent, limits: Limits) -> Change:
    text = event.text
    if text is None or not text.strip():
        raise Rejected(Reason.EMPTY_TEXT, "an upsert needs a non-empty `text`")
    encoded = _metadata_json(event.metadata)
    size = len(encoded)
    metadata_json = encoded.decode("utf-8")
    if size > limits.max_metadata_bytes:
        raise Rejected(
            Reason.METADATA_TOO_LARGE,
            f"metadata is {size} bytes as JSON; the limit is {limits.max_metadata_bytes}",
        )
    tokens = estimate_tokens(text)
    if limits.oversize_policy is OversizePolicy.CHUNK:
        return _chunked(change, event, metadata_json, text, tokens, limits)
    if tokens > limits.max_tokens_per_text:
        if limits.oversize_policy is OversizePolicy.REJECT:
            raise Rejected(
                Reason.TEXT_TOO_LONG,
                f"the text is about {tokens} tokens (estimated); the model takes at most "
                f"{limits.max_tokens_per_text}",
            )
        text = truncate_to_tokens(text, limits.max_tokens_per_text)
        if not text.strip():
            raise Rejected(
                Reason.TEXT_TOO_LONG,
                f"the text is about {tokens} tokens and nothing but white space fits in "
                f"{limits.max_tokens_per_text}",
            )
        tokens = estimate_tokens(text)
        change.truncated = True
    change.text = text
    change.tokens = tokens
    change.text_type = event.text_type
    change.metadata_json = metadata_json
    change.content_hash = content_hash(text, event.text_type)
    return change


def _chunked(
    change: Change, event: ContentEvent, metadata_json: str, text: str, tokens: int, limits: Limits
) -> Change:
    """A text over the chunk budget becomes its chunks (each embedded as its own row); one
    that fits is embedded whole, as under any policy. The content hash is the whole text's
    (and the budget's), so the skip of unchanged content works per document."""
    budget = min(limits.chunk_tokens, limits.max_tokens_per_text)
    change.text = text
    change.tokens = tokens
    change.text_type = event.text_type
    change.metadata_json = metadata_json
    if tokens <= budget:
        change.content_hash = content_hash(text, event.text_type)
        return change
    overlap = min(limits.chunk_overlap_tokens, budget - 1)
    chunks = split(text, budget, overlap)
    largest = max(estimate_tokens(c) for c in chunks)
    if largest > limits.max_tokens_per_text:  # one character past a tiny budget
        raise Rejected(
            Reason.TEXT_TOO_LONG,
            f"a chunk of the text is about {largest} tokens; the model takes at most "
            f"{limits.max_tokens_per_text}",
        )
    if len(chunks) == 1:  # only white space around one chunk's worth of words
        change.text, change.tokens = chunks[0], largest
        change.content_hash = content_hash(chunks[0], event.text_type)
        return change
    change.chunks = tuple(chunks)
    change.tokens = sum(estimate_tokens(c) for c in chunks)
    change.content_hash = content_hash(text, event.text_type, f"chunks {budget}/{overlap}")
    return change


@dataclass
class Decoded:
    """One fetch, decoded: changes to apply, dead letters to send, offsets only to settle."""

    changes: list[Change] = field(default_factory=list)
    letters: list[tuple[bytes | None, DeadLetter]] = field(default_factory=list)
    settled: list[Settled] = field(default_factory=list)


class Decoder:
    """Decode a whole fetch, tracking each record's offset under its partition's epoch.

    Every partition is decoded and tracked before anything awaits, so a rebalance that
    completes later (during the hash lookup or the dead letters) is seen by the epochs:
    the stale changes are dropped downstream and redone by the partition's next owner.
    """

    def __init__(
        self,
        limits: Limits,
        tracker: OffsetTracker,
        revoking: set[TP],
        stats: Stats,
        tracing: Tracing | None = None,
    ) -> None:
        self.limits = limits
        self.tracker = tracker
        self.revoking = revoking
        self.stats = stats
        self.tracing = tracing

    def fetch(self, fetched: Fetched) -> Decoded:
        out = Decoded()
        for tp, messages in fetched.batches.items():
            self._partition(tp.topic, tp.partition, messages, out)
        for record in fetched.unreadable:  # tracked after the records read before it
            self._unreadable(record, out)
        return out

    def _partition(self, topic: str, partition: int, messages: list[object], out: Decoded) -> None:
        key = (topic, partition)
        epoch = self.tracker.epoch(key)
        if epoch is None or key in self.revoking:
            return  # not (or no longer) ours; whoever owns it now reads it again
        tracing = self.tracing
        for msg in messages:
            record = Record.of(topic, partition, msg)
            if not self.tracker.track(key, record.offset):
                continue  # delivered again after a seek; already in hand
            self.stats.consumed += 1
            result = decode(record, self.limits)
            if isinstance(result, DeadLetter):
                out.letters.append((record.key, result))
                out.settled.append(Settled(topic, partition, record.offset, epoch))
            elif isinstance(result, Ignored):
                out.settled.append(Settled(topic, partition, record.offset, epoch))
            else:
                result.epoch = epoch
                out.changes.append(result)
                if result.chunks:
                    self.stats.chunked += 1
                    self.stats.chunks += len(result.chunks)
            if tracing is not None and not isinstance(result, Ignored):
                span = tracing.received(topic, partition, record.offset, record.headers)
                if isinstance(result, DeadLetter):
                    result._trace = span
                else:
                    result.trace = span

    def _unreadable(self, record: Unreadable, out: Decoded) -> None:
        key = (record.topic, record.partition)
        epoch = self.tracker.epoch(key)
        if epoch is None or key in self.revoking or not self.tracker.track(key, record.offset):
            return
        self.stats.consumed += 1
        out.letters.append((None, record.letter()))
        out.settled.append(Settled(record.topic, record.partition, record.offset, epoch))
