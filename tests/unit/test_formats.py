"""Input formats: CloudEvents (structured and binary), Debezium change events and field
mappings, decoded to the same changes as the native contract, and refused with reasons."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from worker.config import FieldMap, InputFormat, InputSettings, load_settings
from worker.events import DeadLetter, Reason
from worker.model import Change, Record
from worker.pipeline.decode import Limits, decode
from worker.pipeline.formats import Ignored
from worker.tools.produce import check_file

TS_MS = 1_796_083_200_000  # 2026-12-01: the record time, after every event time here


def limits(fmt: InputFormat = InputFormat.NATIVE, **fields: Any) -> Limits:
    return Limits(
        default_namespace="default",
        max_tokens_per_text=8192,
        oversize_policy=load_settings().oversize_policy,
        max_metadata_bytes=64_000,
        input=InputSettings(format=fmt, fields=FieldMap(**fields)),
    )


def record(
    value: dict[str, Any] | None,
    key: bytes | None = None,
    headers: tuple[tuple[str, bytes | None], ...] = (),
) -> Record:
    raw = None if value is None else json.dumps(value).encode()
    return Record("t", 0, 5, key, raw, TS_MS, headers)


def change(result: Change | DeadLetter | Ignored) -> Change:
    assert isinstance(result, Change), result
    return result


def letter(result: Change | DeadLetter | Ignored) -> DeadLetter:
    assert isinstance(result, DeadLetter), result
    return result


# ---- field mapping on the native format -----------------------------------------------------


def test_a_mapping_reads_an_existing_shape() -> None:
    value = {
        "article": {"uid": 42, "title": "Rates rise", "body": "The bank raised rates."},
        "site": "wire",
        "lang": "en",
        "published": "2026-11-20T10:00:00Z",
        "metadata": {"not": "read"},
    }
    lim = limits(
        id="article.uid",
        text=["article.title", "article.body"],
        namespace="site",
        metadata="",  # off: as a TOML file or an environment variable would say it
        metadata_fields=["lang", "article.uid"],
        timestamp="published",
    )
    got = change(decode(record(value, key=b"42"), lim))
    assert (got.namespace, got.id, got.op) == ("wire", "42", "upsert")
    assert got.text == "Rates rise\n\nThe bank raised rates."
    assert json.loads(got.metadata_json) == {"lang": "en", "uid": 42}
    assert got.event_time == datetime(2026, 11, 20, 10, tzinfo=UTC)


def test_a_mapped_event_keeps_the_native_checks() -> None:
    lim = limits(id="uid", text="body")
    # The key is still the content id on the native format.
    assert letter(decode(record({"uid": "a", "body": "x"}, b"b"), lim)).reason is (
        Reason.KEY_MISMATCH
    )
    missing = letter(decode(record({"body": "x"}), lim))
    assert missing.reason is Reason.SCHEMA_VIOLATION
    assert "'uid' (input.fields.id)" in missing.message
    assert letter(decode(record({"uid": "a", "body": " "}), lim)).reason is Reason.EMPTY_TEXT
    assert letter(decode(record({"uid": "a", "body": 3}), lim)).reason is (Reason.SCHEMA_VIOLATION)
    assert letter(decode(record({"uid": "a", "body": "x\x00"}), lim)).reason is Reason.NUL_BYTE


def test_default_fields_decode_the_native_contract_unchanged() -> None:
    value = {"id": "n1", "text": "hello", "metadata": {"a": 1}, "timestamp": TS_MS}
    native = change(decode(record(value, b"n1"), limits()))
    # The same mapping spelled out explicitly goes through formats.to_event.
    spelled = change(decode(record(value, b"n1"), limits(metadata_fields=[])))
    mapped = change(decode(record(value, b"n1"), limits(text=["text"])))
    for other in (spelled, mapped):
        assert (other.id, other.text, other.metadata_json, other.event_time) == (
            native.id,
            native.text,
            native.metadata_json,
            native.event_time,
        )


# ---- CloudEvents -----------------------------------------------------------------------------


def cloudevent(**data: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "/cms",
        "type": "com.example.article.published",
        "subject": "art-7",
        "time": "2026-11-20T10:00:00Z",
        "datacontenttype": "application/json",
        "data": data,
    }


def test_structured_cloudevent() -> None:
    lim = limits(InputFormat.CLOUDEVENTS)
    got = change(decode(record(cloudevent(id="art-7", text="A new recipe"), b"tenant-3"), lim))
    assert (got.id, got.text) == ("art-7", "A new recipe")
    assert got.event_time == datetime(2026, 11, 20, 10, tzinfo=UTC)  # the CloudEvent's time
    assert json.loads(got.metadata_json)["cloudevent"] == {
        "id": "evt-1",
        "source": "/cms",
        "type": "com.example.article.published",
        "subject": "art-7",
    }
    # The id may come from the envelope: `$subject`.
    by_subject = limits(InputFormat.CLOUDEVENTS, id="$subject")
    assert change(decode(record(cloudevent(text="x")), by_subject)).id == "art-7"
    # data_base64 holding JSON is read like data.
    ce = cloudevent()
    del ce["data"]
    ce["data_base64"] = base64.b64encode(b'{"id": "b", "text": "from base64"}').decode()
    assert change(decode(record(ce), lim)).text == "from base64"


def test_binary_cloudevent_from_headers() -> None:
    headers: tuple[tuple[str, bytes | None], ...] = (
        ("ce_specversion", b"1.0"),
        ("ce_id", b"evt-9"),
        ("ce_source", b"/cms"),
        ("ce_type", b"article"),
        ("ce_time", b"2026-11-21T08:30:00Z"),
        ("content-type", b"application/json"),
    )
    lim = limits(InputFormat.CLOUDEVENTS)
    got = change(decode(record({"id": "a1", "text": "binary mode"}, b"a1", headers), lim))
    assert (got.id, got.text) == ("a1", "binary mode")
    assert got.event_time == datetime(2026, 11, 21, 8, 30, tzinfo=UTC)
    assert json.loads(got.metadata_json)["cloudevent"]["id"] == "evt-9"
    # Header values reach the metadata (jsonb): the same checks as the value's strings.
    for bad, reason in ((b"/c\x00ms", Reason.NUL_BYTE), (b"/c\xffms", Reason.INVALID_UTF8)):
        broken = tuple((n, bad if n == "ce_source" else v) for n, v in headers)
        got_bad = letter(decode(record({"id": "a1", "text": "x"}, b"a1", broken), lim))
        assert got_bad.reason is reason, got_bad.message


@pytest.mark.parametrize(
    ("change_to", "expected"),
    [
        ({"specversion": "0.3"}, "not a CloudEvent 1.0"),
        ({"source": ""}, "has no source"),
        ({"data": "plain text"}, "data must be a JSON object, not str"),
        ({"data": None}, "data must be a JSON object"),
        ({"data_base64": "%%%"}, "data_base64 is not base64"),
    ],
)
def test_a_broken_cloudevent_is_a_schema_violation(
    change_to: dict[str, Any], expected: str
) -> None:
    ce = cloudevent(id="x", text="y")
    if "data_base64" in change_to:
        del ce["data"]
    ce.update(change_to)
    got = letter(decode(record(ce), limits(InputFormat.CLOUDEVENTS)))
    assert got.reason is Reason.SCHEMA_VIOLATION and expected in got.message, got.message


# ---- Debezium --------------------------------------------------------------------------------


def debezium(op: str, before: Any = None, after: Any = None, schema: bool = True) -> dict[str, Any]:
    payload = {
        "before": before,
        "after": after,
        "source": {"connector": "postgresql", "db": "shop", "table": "products", "lsn": 2401},
        "op": op,
        "ts_ms": 1_763_632_800_500,
    }
    payload["source"]["ts_ms"] = 1_763_632_800_000
    return {"schema": {"type": "struct"}, "payload": payload} if schema else payload


PRODUCT = {"sku": 7, "name": "Kettle", "description": "Steel kettle, 1.7 l", "shop": "eu"}


@pytest.mark.parametrize("schema", [True, False])
@pytest.mark.parametrize("op", ["c", "r", "u"])
def test_debezium_create_read_update_upsert_the_after_row(op: str, schema: bool) -> None:
    lim = limits(
        InputFormat.DEBEZIUM,
        id="sku",
        text=["name", "description"],
        namespace="shop",
        metadata_fields=["$source.table"],
    )
    key = json.dumps({"sku": 7}).encode()
    got = change(decode(record(debezium(op, after=PRODUCT, schema=schema), key), lim))
    assert (got.namespace, got.id, got.op) == ("eu", "7", "upsert")
    assert got.text == "Kettle\n\nSteel kettle, 1.7 l"
    # The source's time, not the connector's.
    assert got.event_time == datetime.fromtimestamp(1_763_632_800, tz=UTC)
    metadata = json.loads(got.metadata_json)
    assert metadata["table"] == "products"
    assert metadata["debezium"]["lsn"] == 2401  # the source position is kept


def test_debezium_delete_uses_the_before_row_and_its_tombstone_is_ignored() -> None:
    lim = limits(InputFormat.DEBEZIUM, id="sku", namespace="shop")
    key = json.dumps({"sku": 7}).encode()
    got = change(decode(record(debezium("d", before=PRODUCT), key), lim))
    assert (got.namespace, got.id, got.op) == ("eu", "7", "delete")
    assert isinstance(decode(record(None, key), lim), Ignored)


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (debezium("t"), "operation 't' names no row"),
        (debezium("d", before=None), "needs the row in `before`"),
        (debezium("c", after=None), "needs the row in `after`"),
        ({"id": "1", "text": "native"}, "not a Debezium change event"),
        (debezium("c", after={"name": "no key"}), "'sku' (input.fields.id)"),
    ],
)
def test_a_debezium_event_without_a_row_is_a_schema_violation(
    event: dict[str, Any], expected: str
) -> None:
    got = letter(decode(record(event), limits(InputFormat.DEBEZIUM, id="sku", text="name")))
    assert got.reason is Reason.SCHEMA_VIOLATION and expected in got.message, got.message


def test_produce_keys_each_line_by_the_content_id_it_holds(tmp_path: Path) -> None:
    """`produce` under a format: a Debezium line's top level has no `id`, a CloudEvent's
    `id` is the event's, not the content's; either would scatter an id over partitions."""
    settings = load_settings(input={"format": "debezium", "fields": {"id": "sku", "text": "name"}})
    path = tmp_path / "changes.jsonl"
    lines = [debezium("c", after=PRODUCT), debezium("t"), debezium("d", before=PRODUCT)]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    checked = check_file(path, settings)
    assert checked.keys == [b"7", None, b"7"]
    assert [(i.line, i.reason) for i in checked.invalid] == [(2, "schema_violation")]
    settings = load_settings(input={"format": "cloudevents"})
    path.write_text(json.dumps(cloudevent(id="art-7", text="x")) + "\n")
    assert check_file(path, settings).keys == [b"art-7"]
