"""Input envelopes and field mappings: turn a topic's own shape into the native event.

Users rarely control their topics: content arrives as CloudEvents or as Debezium change
events, with the id and text under names of their own. Each format here unwraps its envelope
and the field mapping picks id, text, namespace, metadata, time and operation out of the
result, giving the dict ``ContentEvent`` validates. Every refusal is a ``Rejected`` with a
reason, so a record that does not fit becomes a dead letter, never an exception.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from worker.config import FieldMap, InputFormat, InputSettings
from worker.events import Reason
from worker.jsonvalue import Rejected, check_strings, json_object

# CloudEvents Kafka protocol binding, binary mode: attributes are `ce_`-prefixed headers.
CE_HEADER = "ce_"
CE_REQUIRED = ("id", "source", "type")
# What Debezium operations mean here; `t` (truncate) and `m` (message) name no row.
DEBEZIUM_OPS = {"c": "upsert", "r": "upsert", "u": "upsert", "d": "delete"}
# Where the envelope's own time is, when the mapping's `timestamp` field is absent.
ENVELOPE_TIME = {
    InputFormat.CLOUDEVENTS: ("$time",),
    InputFormat.DEBEZIUM: ("$source.ts_ms", "$ts_ms"),
}
MISSING = object()


@dataclass(frozen=True, slots=True)
class Ignored:
    """A record that is valid and asks for nothing (a Debezium tombstone after its delete)."""


def is_native(settings: InputSettings) -> bool:
    """The worker's own contract with the default field names: no mapping to apply."""
    return settings.format is InputFormat.NATIVE and settings.fields == FieldMap()


def binary_cloudevent(headers: tuple[tuple[str, bytes | None], ...]) -> bool:
    return any(name == CE_HEADER + "specversion" for name, _ in headers)


def unwrap(
    settings: InputSettings, value: dict[str, Any], headers: tuple[tuple[str, bytes | None], ...]
) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """(row, envelope, forced op) of one record's value, per the configured format."""
    if settings.format is InputFormat.CLOUDEVENTS:
        return _cloudevent(value, headers)
    if settings.format is InputFormat.DEBEZIUM:
        return _debezium(value)
    return value, value, None


def to_event(
    settings: InputSettings,
    value: dict[str, Any],
    headers: tuple[tuple[str, bytes | None], ...] = (),
) -> dict[str, Any]:
    """The native event (the README's contract) that ``value`` stands for."""
    row, envelope, op = unwrap(settings, value, headers)
    fields = settings.fields
    event: dict[str, Any] = {"id": _id(_required(fields.id, row, envelope, "id"))}
    texts = [fields.text] if isinstance(fields.text, str) else fields.text
    parts = [_get(path, row, envelope) for path in texts]
    found = [p for p in parts if p is not MISSING and p is not None]
    if found:
        if not all(isinstance(p, str) for p in found):
            raise Rejected(
                Reason.SCHEMA_VIOLATION, f"text fields {texts} (input.fields.text) hold non-text"
            )
        event["text"] = "\n\n".join(p for p in found if p.strip())
    for name in ("namespace", "text_type"):
        path = getattr(fields, name)
        if path is not None and (got := _get(path, row, envelope)) not in (MISSING, None):
            event[name] = got
    event["op"] = op or _optional(fields.op, row, envelope) or "upsert"
    time = _optional(fields.timestamp, row, envelope)
    for path in ENVELOPE_TIME.get(settings.format, ()) if time is None else ():
        time = _optional(path, row, envelope)
        if time is not None:
            break
    if time is not None:
        event["timestamp"] = time
    event["metadata"] = _metadata(settings, row, envelope)
    return event


def tombstone(settings: InputSettings) -> Ignored | None:
    """Debezium follows each delete event with a tombstone for log compaction; the delete
    already did the work (and named the namespace, which a tombstone cannot)."""
    if settings.format is InputFormat.DEBEZIUM:
        return Ignored()  # its delete event was applied
    return None


def _metadata(settings: InputSettings, row: dict[str, Any], envelope: dict[str, Any]) -> Any:
    fields = settings.fields
    base = _optional(fields.metadata, row, envelope)
    if base is None:
        base = {}
    if not isinstance(base, dict):
        raise Rejected(
            Reason.SCHEMA_VIOLATION,
            f"metadata field {fields.metadata!r} must hold an object, not {type(base).__name__}",
        )
    metadata = dict(base)
    for path in fields.metadata_fields:
        got = _get(path, row, envelope)
        if got is not MISSING:
            metadata[path.lstrip("$").rsplit(".", 1)[-1]] = got
    if settings.format is InputFormat.CLOUDEVENTS:
        metadata["cloudevent"] = {
            k: envelope[k] for k in ("id", "source", "type", "subject") if k in envelope
        }
    elif settings.format is InputFormat.DEBEZIUM and isinstance(envelope.get("source"), dict):
        metadata["debezium"] = envelope["source"]  # the source position: db, table, lsn...
    return metadata


def _get(path: str, row: dict[str, Any], envelope: dict[str, Any]) -> Any:
    """A dotted path in the row, or in the envelope when it starts with `$`."""
    node: Any = envelope if path.startswith("$") else row
    for part in path.lstrip("$").split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def _optional(path: str | None, row: dict[str, Any], envelope: dict[str, Any]) -> Any:
    if path is None:
        return None
    got = _get(path, row, envelope)
    return None if got is MISSING else got


def _required(path: str, row: dict[str, Any], envelope: dict[str, Any], what: str) -> Any:
    got = _get(path, row, envelope)
    if got is MISSING or got is None:
        raise Rejected(
            Reason.SCHEMA_VIOLATION,
            f"no {what}: field {path!r} (input.fields.{what}) is missing or null",
        )
    return got


def _id(value: Any) -> Any:
    """Database keys are often integers: 42 and "42" are the same content id."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _cloudevent(
    value: dict[str, Any], headers: tuple[tuple[str, bytes | None], ...]
) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    if binary_cloudevent(headers):
        attributes: dict[str, Any] = {}
        for name, raw in headers:
            if name.startswith(CE_HEADER) and raw is not None:
                try:
                    attributes[name.removeprefix(CE_HEADER)] = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise Rejected(Reason.INVALID_UTF8, f"header {name!r} is not UTF-8") from None
        check_strings(attributes, "CloudEvent header")  # they go into the metadata
        data: Any = value
    else:
        attributes = value
        data = value.get("data", MISSING)
        if data is MISSING and "data_base64" in value:
            data = _base64_json(value["data_base64"])
    if attributes.get("specversion") != "1.0":
        raise Rejected(
            Reason.SCHEMA_VIOLATION,
            f"not a CloudEvent 1.0: specversion is {attributes.get('specversion')!r}",
        )
    missing = [a for a in CE_REQUIRED if not attributes.get(a)]
    if missing:
        raise Rejected(Reason.SCHEMA_VIOLATION, f"the CloudEvent has no {', '.join(missing)}")
    if not isinstance(data, dict):
        raise Rejected(
            Reason.SCHEMA_VIOLATION,
            "the CloudEvent's data must be a JSON object"
            + ("" if data is MISSING else f", not {type(data).__name__}"),
        )
    return data, attributes, None


def _base64_json(text: Any) -> Any:

    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise Rejected(Reason.SCHEMA_VIOLATION, "data_base64 is not base64") from None
    return json_object(raw, "the CloudEvent's data")


def _debezium(value: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    # With the JSON converter's schemas.enable=true the event sits under `payload`.
    payload = value.get("payload") if "schema" in value and "payload" in value else value
    if not isinstance(payload, dict) or "op" not in payload:
        raise Rejected(Reason.SCHEMA_VIOLATION, "not a Debezium change event: no `op`")
    code = payload["op"]
    op = DEBEZIUM_OPS.get(code) if isinstance(code, str) else None
    if op is None:
        raise Rejected(
            Reason.SCHEMA_VIOLATION,
            f"Debezium operation {code!r} names no row to apply (c, r, u and d do)",
        )
    side = "before" if op == "delete" else "after"
    row = payload.get(side)
    if not isinstance(row, dict):
        raise Rejected(
            Reason.SCHEMA_VIOLATION,
            f"a Debezium {code!r} event needs the row in `{side}`"
            + (" (REPLICA IDENTITY or key columns)" if side == "before" else ""),
        )
    return row, payload, op
