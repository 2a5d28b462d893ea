"""JSON values Postgres can store, and the refusal that turns a record into a dead letter.

Shared by the event decoder, the input formats and the decisions consumer, so a value is
accepted or refused the same way (with the same reasons) whichever path read it.
"""

from __future__ import annotations

import json
import math
from typing import Any

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
        # NaN, Infinity and 1e400 parse in Python but Postgres' jsonb refuses them.
        data = json.loads(raw, parse_float=_finite, parse_constant=_no_constant)
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
