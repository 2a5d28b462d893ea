"""decode(): every dead-letter reason, the oversize policies, tombstones, times and hashes."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.config import OversizePolicy
from worker.events import DeadLetter, Reason, TextType
from worker.model import NO_TIME, Change, Record, content_hash
from worker.pipeline.decode import Limits, decode
from worker.pipeline.formats import Ignored
from worker.tokens import estimate_tokens

TS_MS = 1_700_000_000_123
JAPANESE = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"


def limits(
    max_tokens: int = 8192,
    policy: OversizePolicy = OversizePolicy.TRUNCATE,
    max_metadata_bytes: int = 64_000,
    default_namespace: str = "default",
    max_clock_skew_s: float = 300.0,
) -> Limits:
    return Limits(
        default_namespace=default_namespace,
        max_tokens_per_text=max_tokens,
        oversize_policy=policy,
        max_metadata_bytes=max_metadata_bytes,
        max_clock_skew_s=max_clock_skew_s,
    )


def record(
    value: dict[str, Any] | list[Any] | bytes | None,
    key: bytes | None = None,
    headers: tuple[tuple[str, bytes], ...] = (),
    timestamp_ms: int | None = TS_MS,
    offset: int = 7,
) -> Record:
    raw = json.dumps(value).encode() if isinstance(value, dict | list) else value
    return Record(
        topic="content",
        partition=3,
        offset=offset,
        key=key,
        value=raw,
        timestamp_ms=timestamp_ms,
        headers=headers,
    )


def as_change(result: Change | DeadLetter | Ignored) -> Change:
    assert isinstance(result, Change), result
    return result


def as_letter(result: Change | DeadLetter | Ignored) -> DeadLetter:
    assert isinstance(result, DeadLetter), result
    return result


# --- dead-letter reasons ---------------------------------------------------------------------

REJECTED: list[Any] = [
    pytest.param(record(b"\xff\xfe{}"), Reason.INVALID_UTF8, id="value-not-utf8"),
    pytest.param(
        record({"id": "a", "text": "x"}, key=b"\xc3\x28"), Reason.INVALID_UTF8, id="key-not-utf8"
    ),
    pytest.param(record(None, key=b"\xff"), Reason.INVALID_UTF8, id="tombstone-key-not-utf8"),
    pytest.param(
        record(None, key=b"a", headers=(("namespace", b"\xff"),)),
        Reason.INVALID_UTF8,
        id="namespace-header-not-utf8",
    ),
    pytest.param(record(b'{"id": "a", "text": '), Reason.INVALID_JSON, id="truncated-json"),
    pytest.param(record(b"not json at all"), Reason.INVALID_JSON, id="not-json"),
    pytest.param(record([{"id": "a", "text": "x"}]), Reason.SCHEMA_VIOLATION, id="array"),
    pytest.param(record(b'"just a string"'), Reason.SCHEMA_VIOLATION, id="string"),
    pytest.param(record({"text": "x"}), Reason.SCHEMA_VIOLATION, id="missing-id"),
    pytest.param(record({"id": "", "text": "x"}), Reason.SCHEMA_VIOLATION, id="empty-id"),
    pytest.param(record({"id": 5, "text": "x"}), Reason.SCHEMA_VIOLATION, id="id-not-string"),
    pytest.param(
        record({"id": "a", "op": "merge", "text": "x"}), Reason.SCHEMA_VIOLATION, id="bad-op"
    ),
    pytest.param(
        record({"id": "a", "text": "x", "metadata": ["not", "an", "object"]}),
        Reason.SCHEMA_VIOLATION,
        id="metadata-array",
    ),
    pytest.param(
        record({"id": "a", "text": "x", "metadata": "k=v"}),
        Reason.SCHEMA_VIOLATION,
        id="metadata-string",
    ),
    pytest.param(
        record({"id": "a", "text": "x", "text_type": "passage"}),
        Reason.SCHEMA_VIOLATION,
        id="bad-text-type",
    ),
    pytest.param(
        record({"id": "a", "text": "x", "timestamp": "2024-01-02T03:04:05"}),
        Reason.SCHEMA_VIOLATION,
        id="naive-timestamp",
    ),
    pytest.param(record(None), Reason.SCHEMA_VIOLATION, id="tombstone-without-key"),
    pytest.param(record(None, key=b""), Reason.SCHEMA_VIOLATION, id="tombstone-empty-key"),
    pytest.param(
        record({"id": "a", "text": "x"}, key=b"b"), Reason.KEY_MISMATCH, id="key-mismatch"
    ),
    pytest.param(
        record({"id": "a", "op": "delete"}, key=b"b"),
        Reason.KEY_MISMATCH,
        id="key-mismatch-delete",
    ),
    pytest.param(record({"id": "a", "text": ""}), Reason.EMPTY_TEXT, id="empty-text"),
    pytest.param(record({"id": "a", "text": " \t\n\u3000 "}), Reason.EMPTY_TEXT, id="whitespace"),
    pytest.param(record({"id": "a"}), Reason.EMPTY_TEXT, id="missing-text"),
    pytest.param(record({"id": "a", "text": None}), Reason.EMPTY_TEXT, id="null-text"),
    pytest.param(record({"id": "a", "text": "a\x00b"}), Reason.NUL_BYTE, id="nul-in-text"),
    pytest.param(
        record({"id": "a", "text": "x", "metadata": {"k\x00": 1}}),
        Reason.NUL_BYTE,
        id="nul-in-metadata-key",
    ),
    pytest.param(
        record({"id": "a", "text": "x", "metadata": {"k": "v\x00"}}),
        Reason.NUL_BYTE,
        id="nul-in-metadata-value",
    ),
    pytest.param(
        record({"id": "a", "text": "x", "metadata": {"k": {"deep": ["ok", "v\x00"]}}}),
        Reason.NUL_BYTE,
        id="nul-in-nested-metadata",
    ),
    pytest.param(record({"id": "a\x00", "text": "x"}), Reason.NUL_BYTE, id="nul-in-id"),
    pytest.param(
        record({"id": "a", "text": "x", "namespace": "n\x00"}),
        Reason.NUL_BYTE,
        id="nul-in-namespace",
    ),
]


@pytest.mark.parametrize(("rec", "reason"), REJECTED)
def test_dead_letter_reason(rec: Record, reason: Reason) -> None:
    letter = as_letter(decode(rec, limits()))
    assert letter.reason is reason
    assert letter.message
    # The envelope carries what is needed to replay the exact record.
    assert letter.source.topic == rec.topic
    assert letter.source.partition == rec.partition
    assert letter.source.offset == rec.offset
    assert letter.source.timestamp_ms == rec.timestamp_ms
    if rec.value is None:
        assert letter.value_b64 is None
    else:
        assert letter.value_b64 is not None
        assert base64.b64decode(letter.value_b64) == rec.value
    if rec.key is None:
        assert letter.key_b64 is None
    else:
        assert letter.key_b64 is not None
        assert base64.b64decode(letter.key_b64) == rec.key


def test_nul_message_says_where() -> None:
    event = {"id": "a", "text": "x", "metadata": {"colour_code": "v\x00"}}
    letter = as_letter(decode(record(event), limits()))
    assert "colour_code" in letter.message


def test_metadata_too_large() -> None:
    metadata = {"tags": ["x" * 50] * 4}
    size = len(json.dumps(metadata, separators=(",", ":")).encode())
    at_limit = decode(
        record({"id": "a", "text": "x", "metadata": metadata}), limits(max_metadata_bytes=size)
    )
    assert as_change(at_limit).metadata_json == json.dumps(metadata, separators=(",", ":"))
    over = decode(
        record({"id": "a", "text": "x", "metadata": metadata}), limits(max_metadata_bytes=size - 1)
    )
    assert as_letter(over).reason is Reason.METADATA_TOO_LARGE


def test_metadata_limit_counts_utf8_bytes_not_characters() -> None:
    metadata = {"title": JAPANESE}
    chars = len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")))
    result = decode(
        record({"id": "a", "text": "x", "metadata": metadata}), limits(max_metadata_bytes=chars)
    )
    assert as_letter(result).reason is Reason.METADATA_TOO_LARGE


@pytest.mark.parametrize(
    "metadata",
    [
        {"big": 123456789012345678901234567890, "neg": -(2**70)},  # past 64 bits: kept exact
        {"title": JAPANESE, "n": [1, 2.5, None, True], "nested": {"k": "\u00e9"}},
    ],
)
def test_metadata_is_stored_as_the_same_json_values(metadata: dict[str, Any]) -> None:
    change = as_change(decode(record({"id": "a", "text": "x", "metadata": metadata}), limits()))
    assert json.loads(change.metadata_json) == metadata
    assert '"big":123456789012345678901234567890' in change.metadata_json or "big" not in metadata


def test_metadata_too_large_message_reports_bytes() -> None:
    metadata = {"title": JAPANESE}
    as_json = json.dumps(metadata, ensure_ascii=False, separators=(",", ":"))
    result = decode(
        record({"id": "a", "text": "x", "metadata": metadata}), limits(max_metadata_bytes=10)
    )
    letter = as_letter(result)
    assert letter.reason is Reason.METADATA_TOO_LARGE
    assert f"{len(as_json.encode())} bytes" in letter.message


def test_text_too_long_is_rejected_under_reject_policy() -> None:
    text = "word " * 40
    limit = estimate_tokens(text) - 1
    result = decode(record({"id": "a", "text": text}), limits(limit, OversizePolicy.REJECT))
    letter = as_letter(result)
    assert letter.reason is Reason.TEXT_TOO_LONG
    assert str(limit) in letter.message
    # Exactly at the limit is fine.
    ok = decode(record({"id": "a", "text": text}), limits(limit + 1, OversizePolicy.REJECT))
    assert not as_change(ok).truncated


# --- oversize truncation ---------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "a", "ab"])  # shift the cut to every byte of a character
def test_truncate_policy_cuts_on_a_character_boundary(prefix: str) -> None:
    text = prefix + JAPANESE * 5
    max_tokens = 10
    change = as_change(decode(record({"id": "a", "text": text}), limits(max_tokens)))
    assert change.truncated
    assert text.startswith(change.text)
    assert 0 < len(change.text) < len(text)
    assert len(change.text.encode()) <= max_tokens * 3
    # Maximal: one more character would no longer fit.
    assert estimate_tokens(text[: len(change.text) + 1]) > max_tokens
    assert change.tokens == estimate_tokens(change.text) <= max_tokens
    assert change.content_hash == content_hash(change.text, TextType.DOCUMENT)


def test_short_text_is_not_truncated() -> None:
    change = as_change(decode(record({"id": "a", "text": JAPANESE}), limits()))
    assert not change.truncated
    assert change.text == JAPANESE
    assert change.tokens == estimate_tokens(JAPANESE)


# --- valid events ----------------------------------------------------------------------------


def test_upsert_fields() -> None:
    event = {
        "id": "doc-1",
        "text": "hello",
        "namespace": "ns",
        "metadata": {"lang": "en", "n": 1},
        "text_type": "query",
    }
    change = as_change(decode(record(event, key=b"doc-1"), limits()))
    assert (change.op, change.key, change.text, change.text_type) == (
        "upsert",
        ("ns", "doc-1"),
        "hello",
        TextType.QUERY,
    )
    assert json.loads(change.metadata_json) == event["metadata"]
    assert (change.topic, change.partition, change.offset) == ("content", 3, 7)
    assert change.vector is None


def test_missing_namespace_uses_the_default() -> None:
    change = as_change(decode(record({"id": "a", "text": "x"}), limits(default_namespace="dflt")))
    assert change.namespace == "dflt"


def test_delete_without_text_is_fine() -> None:
    change = as_change(decode(record({"id": "a", "op": "delete", "namespace": "ns"}), limits()))
    assert change.op == "delete"
    assert change.key == ("ns", "a")
    assert change.text == ""


def test_tombstone_uses_namespace_header() -> None:
    rec = record(None, key=b"doc-9", headers=(("other", b"x"), ("namespace", b"tenant-7")))
    change = as_change(decode(rec, limits(default_namespace="dflt")))
    assert (change.op, change.id, change.namespace) == ("delete", "doc-9", "tenant-7")


def test_tombstone_without_header_uses_default_namespace() -> None:
    change = as_change(decode(record(None, key=b"doc-9"), limits(default_namespace="dflt")))
    assert (change.op, change.key) == ("delete", ("dflt", "doc-9"))
    assert change.event_time == datetime.fromtimestamp(TS_MS / 1000, tz=UTC)


@pytest.mark.parametrize(
    "rec",
    [
        pytest.param(record(None, key=b"doc\x00"), id="nul-in-key"),
        pytest.param(
            record(None, key=b"doc", headers=(("namespace", b"n\x00s"),)), id="nul-in-header"
        ),
    ],
)
def test_tombstone_with_nul_is_dead_lettered(rec: Record) -> None:
    assert as_letter(decode(rec, limits())).reason is Reason.NUL_BYTE


def test_event_time_falls_back_to_the_record_timestamp() -> None:
    change = as_change(decode(record({"id": "a", "text": "x"}, timestamp_ms=TS_MS), limits()))
    assert change.event_time == datetime.fromtimestamp(TS_MS / 1000, tz=UTC)
    other = as_change(decode(record({"id": "a", "text": "x"}, timestamp_ms=TS_MS + 5000), limits()))
    assert (other.event_time - change.event_time).total_seconds() == 5


def test_epoch_millis_and_iso_timestamps_agree() -> None:
    expected = datetime.fromtimestamp(TS_MS / 1000, tz=UTC)
    iso = expected.isoformat().replace("+00:00", "Z")
    offset = expected.astimezone(timezone(timedelta(hours=9))).isoformat()
    assert iso.endswith("Z") and offset.endswith("+09:00")
    times = []
    for ts in (TS_MS, float(TS_MS), iso, offset):
        # The record's own timestamp differs (a minute later): the event's time must win.
        rec = record({"id": "a", "text": "x", "timestamp": ts}, timestamp_ms=TS_MS + 60_000)
        times.append(as_change(decode(rec, limits())).event_time)
    assert times == [expected] * 4
    assert all(t.tzinfo is not None for t in times)


def test_content_hash_depends_on_text_type_and_is_stable() -> None:
    doc = as_change(decode(record({"id": "a", "text": "same"}), limits()))
    query = as_change(decode(record({"id": "a", "text": "same", "text_type": "query"}), limits()))
    again = as_change(decode(record({"id": "b", "text": "same"}, offset=99), limits()))
    other = as_change(decode(record({"id": "a", "text": "different"}), limits()))
    assert doc.content_hash != query.content_hash
    assert doc.content_hash == again.content_hash == content_hash("same", TextType.DOCUMENT)
    assert query.content_hash == content_hash("same", TextType.QUERY)
    assert doc.content_hash != other.content_hash
    assert len(doc.content_hash) == 32


# --- robustness ------------------------------------------------------------------------------


# Also the corpus on which tests/unit/test_jsonvalue.py compares msgspec with the stdlib.
HOSTILE = [
    pytest.param(
        b'{"id": "a", "text": "x\\ud800"}',
        id="lone-surrogate-in-text",
    ),
    pytest.param(
        b'{"id": "a", "text": "x", "metadata": {"k": "\\udc00"}}',
        id="lone-surrogate-in-metadata",
    ),
    pytest.param(
        b'{"id": "a", "text": "x", "timestamp": Infinity}',
        id="timestamp-infinity",
    ),
    pytest.param(
        b'{"id": "a", "text": "x", "timestamp": 1e300}',
        id="timestamp-1e300",
    ),
    pytest.param(
        b'{"id": "a", "text": "x", "timestamp": 1' + b"0" * 400 + b"}",
        id="timestamp-huge-int",
    ),
    pytest.param(
        b"[" * 100_000,
        id="deeply-nested",
    ),
    pytest.param(
        b'{"id": "a", "text": "x", "n": ' + b"9" * 5000 + b"}",
        id="5000-digit-int",
    ),
    # Controls: the same shapes within range are dead-lettered (or accepted) already.
    pytest.param(b'{"id": "a", "text": "x", "timestamp": NaN}', id="timestamp-nan"),
    pytest.param(b'{"id": "a", "text": "x", "timestamp": 1e17}', id="timestamp-year-overflow"),
    pytest.param(b"[" * 500, id="shallow-unclosed"),
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_json_is_dead_lettered_not_raised(value: bytes) -> None:
    letter = as_letter(decode(record(value), limits()))
    assert letter.reason in (Reason.INVALID_JSON, Reason.INVALID_UTF8, Reason.SCHEMA_VIOLATION)


ALL_REASONS = set(Reason)


def check_result(result: Change | DeadLetter | Ignored, rec: Record, lim: Limits) -> None:
    assert isinstance(result, Change | DeadLetter)
    if isinstance(result, DeadLetter):
        assert isinstance(result.reason, Reason)
        assert result.reason in ALL_REASONS
        assert result.source.offset == rec.offset
        return
    assert (result.topic, result.partition, result.offset) == (rec.topic, rec.partition, rec.offset)
    assert result.event_time.tzinfo is not None
    if rec.key is not None:
        assert result.id == rec.key.decode()
    if result.op == "upsert" and result.chunks:
        assert lim.oversize_policy is OversizePolicy.CHUNK and len(result.chunks) > 1
        budget = min(lim.chunk_tokens, lim.max_tokens_per_text)
        assert all(c.strip() and estimate_tokens(c) <= budget for c in result.chunks)
        assert result.tokens == sum(estimate_tokens(c) for c in result.chunks)
        spec = f"chunks {budget}/{min(lim.chunk_overlap_tokens, budget - 1)}"
        assert result.content_hash == content_hash(result.text, result.text_type, spec)
    elif result.op == "upsert":
        assert result.text
        assert result.tokens == estimate_tokens(result.text) <= lim.max_tokens_per_text
        assert result.content_hash == content_hash(result.text, result.text_type)
        assert len(result.metadata_json.encode()) <= lim.max_metadata_bytes
    if rec.value is not None:
        assert "\x00" not in result.id + result.namespace + result.text + result.metadata_json


limit_strategy = st.builds(
    limits,
    max_tokens=st.integers(2, 60),
    policy=st.sampled_from(OversizePolicy),
    max_metadata_bytes=st.integers(1, 300),
)


@settings(max_examples=300, deadline=None)
@given(
    value=st.none() | st.binary(max_size=300),
    key=st.none() | st.binary(max_size=20),
    header=st.none() | st.binary(max_size=20),
    lim=limit_strategy,
)
def test_decode_never_raises_on_arbitrary_bytes(
    value: bytes | None, key: bytes | None, header: bytes | None, lim: Limits
) -> None:
    headers = () if header is None else (("namespace", header),)
    rec = record(value, key=key, headers=headers)
    check_result(decode(rec, lim), rec, lim)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
chaotic_fields = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(min_size=1, max_size=20) | json_values,
        "op": st.sampled_from(["upsert", "delete", "merge"]) | json_values,
        "text": st.text(max_size=300) | json_values,
        "namespace": st.text(max_size=10) | json_values,
        "metadata": st.dictionaries(st.text(max_size=8), json_values, max_size=5) | json_values,
        "text_type": st.sampled_from(["document", "query", "passage"]) | json_values,
        "timestamp": st.integers(-(2**53), 2**53)
        | st.sampled_from(["2024-01-02T03:04:05Z", "2024-01-02T03:04:05+09:00", "2024-01-02", "x"])
        | json_values,
    },
)
# Mostly well-formed events, so that the valid paths (truncation, hashing) are exercised too.
plausible_fields = st.fixed_dictionaries(
    {"id": st.text(min_size=1, max_size=20), "text": st.text(max_size=300)},
    optional={
        "op": st.sampled_from(["upsert", "delete"]),
        "namespace": st.text(min_size=1, max_size=10),
        "metadata": st.dictionaries(st.text(max_size=8), json_values, max_size=5),
        "text_type": st.sampled_from(["document", "query"]),
        "timestamp": st.integers(0, 2**42) | st.just("2024-01-02T03:04:05.5+09:00"),
    },
)


@st.composite
def json_records(draw: st.DrawFn) -> Record:
    event: dict[str, Any] = {**draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3))}
    event.update(draw(plausible_fields if draw(st.booleans()) else chaotic_fields))
    value = json.dumps(event, ensure_ascii=draw(st.booleans())).encode()
    key_kind = draw(st.sampled_from(["none", "id", "other"]))
    key: bytes | None = None
    if key_kind == "id" and isinstance(event.get("id"), str):
        key = event["id"].encode()
    elif key_kind == "other":
        key = draw(st.text(max_size=10)).encode()
    return record(value, key=key, offset=draw(st.integers(0, 2**40)))


@settings(max_examples=300, deadline=None)
@given(rec=json_records(), lim=limit_strategy)
def test_decode_never_raises_on_json_objects(rec: Record, lim: Limits) -> None:
    check_result(decode(rec, lim), rec, lim)


def test_truncation_that_leaves_only_white_space_is_dead_lettered() -> None:
    text = " " * 3000 + "the words come too late"
    letter = as_letter(decode(record({"id": "w", "text": text}), limits(max_tokens=100)))
    assert letter.reason is Reason.TEXT_TOO_LONG


def test_dead_letter_names_the_event_once_it_could_be_read() -> None:
    letter = as_letter(decode(record({"id": "n1", "namespace": "news", "text": " "}), limits()))
    assert (letter.namespace, letter.id, letter.reason) == ("news", "n1", Reason.EMPTY_TEXT)
    unreadable = as_letter(decode(record(b"{nope"), limits()))
    assert (unreadable.namespace, unreadable.id) == (None, None)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b'{"id": "a", "text": "t", "metadata": {"v": NaN}}', Reason.INVALID_JSON),
        (b'{"id": "a", "text": "t", "metadata": {"v": -Infinity}}', Reason.INVALID_JSON),
        (b'{"id": "a", "text": "t", "metadata": {"v": 1e400}}', Reason.INVALID_JSON),
        (
            b'{"id": "a", "text": "t", "timestamp": "0001-01-01T00:00:00+01:00"}',
            Reason.SCHEMA_VIOLATION,
        ),
        (
            b'{"id": "a", "text": "t", "timestamp": "9999-12-31T23:30:00-01:00"}',
            Reason.SCHEMA_VIOLATION,
        ),
        (json.dumps({"id": "\U0001f600" * 300, "text": "t"}).encode(), Reason.SCHEMA_VIOLATION),
        (
            json.dumps({"id": "a", "namespace": "n" * 513, "text": "t"}).encode(),
            Reason.SCHEMA_VIOLATION,
        ),
    ],
)
def test_values_postgres_would_refuse_are_dead_lettered(value: bytes, reason: Reason) -> None:
    assert as_letter(decode(record(value), limits())).reason is reason


def test_oversized_tombstone_key_is_dead_lettered() -> None:
    letter = as_letter(decode(record(None, key=b"k" * 3000), limits()))
    assert letter.reason is Reason.SCHEMA_VIOLATION


def test_a_record_without_time_orders_by_offset_and_replays_identically() -> None:
    one = as_change(decode(record({"id": "a", "text": "t"}, timestamp_ms=-1), limits()))
    two = as_change(decode(record({"id": "a", "text": "t"}, timestamp_ms=None), limits()))
    assert one.event_time == two.event_time == NO_TIME


def test_huge_values_are_cut_in_the_dead_letter_and_say_so() -> None:
    value = json.dumps({"id": "a", "text": "t", "metadata": {"b": "z" * 900_000}}).encode()
    letter = as_letter(decode(record(value), limits()))
    assert letter.value_truncated and letter.value_size == len(value)
    assert letter.value_b64 is not None and value.startswith(base64.b64decode(letter.value_b64))
    assert len(letter.model_dump_json()) <= limits().dead_letter_bytes


# --- one identity check for upserts, deletes and tombstones -----------------------------------


def _by_path(path: str, id: str, namespace: str | None) -> Record:
    """The same (namespace, id) arriving as an upsert, a delete event or a tombstone."""
    if path == "tombstone":
        headers = () if namespace is None else (("namespace", namespace.encode()),)
        return record(None, key=id.encode(), headers=headers)
    event: dict[str, Any] = {"id": id, "op": path, "text": "t"}
    if namespace is not None:
        event["namespace"] = namespace
    return record(event, key=id.encode())


PATHS = ["upsert", "delete", "tombstone"]
OVER_LIMITS = [
    pytest.param("i" * 513, None, "the id is 513 characters; at most 512", id="id-513-chars"),
    pytest.param(
        "\U0001f600" * 300, None, "the id is 1200 bytes as UTF-8; at most 1024", id="id-1200-bytes"
    ),
    pytest.param("a", "n" * 201, "the namespace is 201 characters; at most 200", id="ns-201-chars"),
    pytest.param(
        "a", "\u3042" * 200, "the namespace is 600 bytes as UTF-8; at most 512", id="ns-600-bytes"
    ),
    pytest.param("a", "", "the namespace is empty", id="ns-empty"),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("id", "namespace", "message"), OVER_LIMITS)
def test_id_and_namespace_limits_are_the_same_for_every_kind_of_event(
    path: str, id: str, namespace: str | None, message: str
) -> None:
    letter = as_letter(decode(_by_path(path, id, namespace), limits()))
    assert (letter.reason, letter.message) == (Reason.SCHEMA_VIOLATION, message)
    assert letter.id is None, "a letter names only an id that could key a row"


@pytest.mark.parametrize("path", PATHS)
def test_id_and_namespace_at_their_limits_are_accepted_for_every_kind_of_event(path: str) -> None:
    id, namespace = "\u3042" * 341 + "i", "n" * 200  # 1,024 bytes; 200 characters
    change = as_change(decode(_by_path(path, id, namespace), limits()))
    assert change.key == (namespace, id)
    long_ascii = as_change(decode(_by_path(path, "i" * 512, "\u3042" * 170), limits()))
    assert len(long_ascii.id) == 512


@pytest.mark.parametrize("path", PATHS)
def test_empty_id_is_refused_for_every_kind_of_event(path: str) -> None:
    letter = as_letter(decode(_by_path(path, "", "ns"), limits()))
    assert (letter.reason, letter.message) == (Reason.SCHEMA_VIOLATION, "the id is empty")


# --- clock skew: a version far ahead would freeze its document --------------------------------

YEARS = 5 * 365 * 86400 * 1000


def _now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


@pytest.mark.parametrize(
    "rec",
    [
        pytest.param(
            record({"id": "a", "text": "x", "timestamp": TS_MS + YEARS}), id="event-years-ahead"
        ),
        pytest.param(
            record({"id": "a", "op": "delete", "timestamp": TS_MS + YEARS}),
            id="delete-years-ahead",
        ),
        pytest.param(
            record({"id": "a", "text": "x", "timestamp": TS_MS + 301_000}), id="event-301s-ahead"
        ),
        pytest.param(
            record({"id": "a", "text": "x"}, timestamp_ms=_now_ms() + YEARS),
            id="record-time-years-ahead",
        ),
        pytest.param(
            record(None, key=b"a", timestamp_ms=_now_ms() + YEARS), id="tombstone-years-ahead"
        ),
        pytest.param(
            record({"id": "a", "text": "x", "timestamp": _now_ms() + 3_600_000}, timestamp_ms=None),
            id="no-record-time-event-an-hour-ahead-of-the-clock",
        ),
    ],
)
def test_a_version_far_ahead_is_dead_lettered(rec: Record) -> None:
    letter = as_letter(decode(rec, limits()))
    assert letter.reason is Reason.TIMESTAMP_OUT_OF_RANGE
    assert "max_clock_skew_s" in letter.message
    assert letter.source.offset == rec.offset


@pytest.mark.parametrize(
    "rec",
    [
        pytest.param(record({"id": "a", "text": "x", "timestamp": TS_MS + 300_000}), id="300s"),
        pytest.param(record({"id": "a", "text": "x", "timestamp": TS_MS - YEARS}), id="past"),
        pytest.param(
            record({"id": "a", "text": "x", "timestamp": _now_ms()}, timestamp_ms=None),
            id="no-record-time",
        ),
        # No record time: -1 (aiokafka's "none"), and 0, the epoch, which is NO_TIME.
        pytest.param(
            record({"id": "a", "text": "x", "timestamp": _now_ms()}, timestamp_ms=-1),
            id="record-time-minus-one",
        ),
        pytest.param(
            record({"id": "a", "text": "x", "timestamp": _now_ms()}, timestamp_ms=0),
            id="record-time-zero",
        ),
        pytest.param(record(None, key=b"a", timestamp_ms=_now_ms() + 60_000), id="tombstone-60s"),
        # Ordered by the event's own time: the record's bad clock freezes nothing.
        pytest.param(
            record({"id": "a", "text": "x", "timestamp": TS_MS}, timestamp_ms=_now_ms() + YEARS),
            id="record-ahead-event-time-fine",
        ),
    ],
)
def test_a_version_within_the_skew_is_accepted(rec: Record) -> None:
    as_change(decode(rec, limits()))


def test_clock_skew_is_a_setting() -> None:
    rec = record({"id": "a", "text": "x", "timestamp": TS_MS + 10_000})
    assert (
        as_letter(decode(rec, limits(max_clock_skew_s=9))).reason is Reason.TIMESTAMP_OUT_OF_RANGE
    )
    as_change(decode(rec, limits(max_clock_skew_s=10)))
