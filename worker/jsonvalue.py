"""JSON values Postgres can store, and the refusal that turns a record into a dead letter.

Shared by the event decoder, the input formats and the decisions consumer, so a value is
accepted or refused the same way (with the same reasons) whichever path read it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import msgspec
from pydantic import ValidationError

from worker.events import Reason


class Rejected(Exception):
    """Why a record cannot be applied: its reason and message become its dead letter."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.namespace: str | None = None
        self.id: str | None = None


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a JSON number")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# msgspec parses an event about 8x faster than the standard library and, where it succeeds,
# to the same values (integers past 64 bits included; tests/unit/test_jsonvalue.py). What it
# refuses goes to the standard library, whose refusal and message decide the dead letter.
_FAST = msgspec.json.Decoder()
# Both parsers stop at Python's recursion limit, msgspec a few levels deeper (json.loads' own
# frames count against it): a value that could nest deeper than this is left to the standard
# library, so that it is refused as before. n levels take n `[` or `{` and 2n bytes.
_FAST_MAX_DEPTH = 256


def _parse(value: bytes, raw: str) -> Any:
    """The JSON value of ``value`` (``raw``: the same, decoded)."""
    if len(value) <= 2 * _FAST_MAX_DEPTH or (
        value.count(b"[") + value.count(b"{") <= _FAST_MAX_DEPTH
    ):
        try:
            return _FAST.decode(value)
        except Exception:  # whatever msgspec refuses, the standard library says why
            return _stdlib(raw)
    return _stdlib(raw)


def _stdlib(raw: str) -> Any:
    # NaN, Infinity and 1e400 parse in Python but Postgres' jsonb refuses them.
    return json.loads(raw, parse_float=_finite, parse_constant=_no_constant)


def json_object(value: bytes, what: str) -> dict[str, Any]:
    """A record value as a JSON object Postgres can store, or ``Rejected`` with the reason
    (invalid UTF-8, not JSON, not an object, a NUL or lone surrogate in a string)."""
    try:
        raw = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected(
            Reason.INVALID_UTF8, f"the value is not valid UTF-8 (byte {exc.start})"
        ) from None
    try:
        data = _parse(value, raw)
    except (ValueError, RecursionError) as exc:  # incl. over-deep nesting, huge integers
        raise Rejected(Reason.INVALID_JSON, f"the value is not JSON: {exc}"[:500]) from None
    if not isinstance(data, dict):
        raise Rejected(
            Reason.SCHEMA_VIOLATION, f"{what} must be a JSON object, not {type(data).__name__}"
        )
    # A NUL or a lone surrogate can only come in as a \u escape: raw control characters are
    # not JSON, and text decoded from UTF-8 holds no surrogates. Most values have no escape.
    if "\\u" in raw:
        check_strings(data)
    return data


def check_strings(value: Any, where: str = "value") -> None:
    """Postgres text and jsonb cannot hold U+0000, and JSON escapes can smuggle in lone
    surrogates that are not valid UTF-8; say where either was."""
    if isinstance(value, str):
        if "\x00" in value:
            raise Rejected(Reason.NUL_BYTE, f"{where} contains a NUL character (U+0000)")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Rejected(
                Reason.INVALID_UTF8, f"{where} contains an unpaired surrogate escape"
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_strings(k, f"{where} key")
            check_strings(v, f"{where}.{k}" if where != "value" else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_strings(v, f"{where}[{i}]")


def describe(exc: ValidationError) -> str:
    """A model's validation errors as one line for a dead letter: where, and what."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "value"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
