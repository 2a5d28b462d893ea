"""Build a dead letter that always fits the dead-letter topic.

A record near the broker's size limit gives an envelope over it (base64 adds a third, JSON
and the copies of key and headers more), and a produce error that no retry fixes would stop
the worker on every restart. So the copies of the original key, value and headers share a
byte budget, fairly (what is small is copied whole, the rest split what is left); what is cut
keeps a prefix, and every part keeps its size and SHA-256, so ``dead-letters --replay`` can
read the original again from its source topic/partition/offset and check it is the same.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from worker.events import (
    ID_MAX_CHARS,
    NAMESPACE_MAX_CHARS,
    DeadLetter,
    HeaderCopy,
    Reason,
    SourcePosition,
)
from worker.jsonvalue import Rejected
from worker.sinks.publish import MAX_KEY_BYTES

if TYPE_CHECKING:
    from worker.model import Record

Headers = Sequence[tuple[str, bytes | None]]

# Kafka's record and batch framing around a dead letter (batch header 61 bytes, record
# varints, attributes, timestamps): far less than this.
RECORD_OVERHEAD_BYTES = 1024
DEFAULT_MAX_MESSAGE_BYTES = 1_000_000
MAX_MESSAGE_CHARS = 1000


def envelope_budget(max_message_bytes: int) -> int:
    """Bytes the envelope's JSON may take in a dead-letter record of at most
    ``max_message_bytes`` (its Kafka key, capped by ``publish``, and the framing set apart)."""
    return max_message_bytes - MAX_KEY_BYTES - RECORD_OVERHEAD_BYTES


def headers_digest(headers: Headers) -> str:
    """SHA-256 of the headers in order, each as <u32 name length><name><u32 value length or
    0xFFFFFFFF for null><value> (big-endian), so that replay can check what it fetched."""
    sha = hashlib.sha256()
    for name, value in headers:
        raw = name.encode("utf-8", "surrogatepass")
        sha.update(struct.pack(">I", len(raw)) + raw)
        sha.update(struct.pack(">I", 0xFFFFFFFF if value is None else len(value)))
        sha.update(value or b"")
    return sha.hexdigest()


def headers_size(headers: Headers) -> int:
    return sum(len(n.encode("utf-8", "surrogatepass")) + len(v or b"") for n, v in headers)


def digest(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


T = TypeVar("T")


def read_or_letter(record: Record, what: str, budget: int, read: Callable[[], T]) -> T | DeadLetter:
    """``read()``, which never escapes: what it refuses (``Rejected``) becomes a dead letter
    with its reason, and a check nobody foresaw a ``schema_violation`` naming the error."""
    try:
        return read()
    except Rejected as exc:
        return dead_letter(
            record, exc.reason, exc.message, namespace=exc.namespace, id=exc.id, budget=budget
        )
    except Exception as exc:  # a check we did not foresee must not stop the worker
        return dead_letter(
            record,
            Reason.SCHEMA_VIOLATION,
            f"{what} could not be read: {exc!r}"[:500],
            budget=budget,
        )


def dead_letter(
    record: Record,
    reason: Reason,
    message: str,
    provider_code: str | None = None,
    namespace: str | None = None,
    id: str | None = None,
    budget: int = envelope_budget(DEFAULT_MAX_MESSAGE_BYTES),
) -> DeadLetter:
    """The envelope for ``record``, at most ``budget`` bytes as JSON."""
    headers = [(_printable(n), v) for n, v in record.headers]
    full = DeadLetter(
        reason=reason,
        message=message[:MAX_MESSAGE_CHARS],
        provider_code=None if provider_code is None else provider_code[:100],
        namespace=namespace if namespace is None or len(namespace) <= NAMESPACE_MAX_CHARS else None,
        id=id if id is None or len(id) <= ID_MAX_CHARS else None,
        key_b64=_b64(record.key),
        value_b64=_b64(record.value),
        headers=[HeaderCopy(key=n, value_b64=_b64(v)) for n, v in headers],
        key_size=None if record.key is None else len(record.key),
        key_sha256=digest(record.key),
        value_size=None if record.value is None else len(record.value),
        value_sha256=digest(record.value),
        headers_size=headers_size(record.headers),
        headers_sha256=headers_digest(record.headers),
        source=SourcePosition(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp_ms,
        ),
    )
    if _size(full) <= budget:
        return full
    bare = full.stripped()
    room = budget - _size(bare) - 16  # "false" is longer than "true": flags may turn back
    if room <= 0:
        return bare
    key_room, value_room, headers_room = _share(
        room, [len(full.key_b64 or ""), len(full.value_b64 or ""), _entries_size(full.headers)]
    )
    cut = bare.model_copy(
        update={
            "key_b64": _prefix(record.key, key_room),
            "key_truncated": _cut(record.key, key_room),
            "value_b64": _prefix(record.value, value_room),
            "value_truncated": _cut(record.value, value_room),
            "headers": _fitting(full.headers, headers_room),
        }
    )
    cut.headers_truncated = cut.headers != full.headers
    return cut if _size(cut) <= budget else bare


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _printable(name: str) -> str:
    """Header names come decoded from UTF-8; a lone surrogate would stop JSON serialisation."""
    return name.encode("utf-8", "replace").decode("utf-8")


def _size(letter: DeadLetter) -> int:
    return len(letter.model_dump_json())


def _entries_size(headers: Sequence[HeaderCopy]) -> int:
    return sum(len(h.model_dump_json()) + 1 for h in headers)


def _share(room: int, wants: list[int]) -> list[int]:
    """Max-min fair shares of ``room``: what wants less than an equal share gets it whole,
    and what it leaves goes to the others."""
    out = [0] * len(wants)
    left = room
    pending = sorted(range(len(wants)), key=lambda i: wants[i])
    while pending:
        share = left // len(pending)
        i = pending.pop(0)
        out[i] = min(wants[i], share)
        left -= out[i]
    return out


def _prefix(data: bytes | None, room: int) -> str | None:
    """The longest prefix whose base64 takes at most ``room`` characters."""
    if data is None:
        return None
    return base64.b64encode(data[: max(0, room) // 4 * 3]).decode("ascii")


def _cut(data: bytes | None, room: int) -> bool:
    return data is not None and len(data) > max(0, room) // 4 * 3


def _fitting(headers: Sequence[HeaderCopy], room: int) -> list[HeaderCopy]:
    """The first headers that fit in ``room`` characters, the last one maybe with a prefix
    of its value (as with key and value, a cut copy is a prefix of the original)."""
    out: list[HeaderCopy] = []
    for header in headers:
        cost = len(header.model_dump_json()) + 1
        if cost <= room:
            out.append(header)
            room -= cost
            continue
        empty = header.model_copy(update={"value_b64": ""})
        left = room - len(empty.model_dump_json()) - 1
        if header.value_b64 is not None and left >= 0:
            value = base64.b64decode(header.value_b64)
            out.append(empty.model_copy(update={"value_b64": _prefix(value, left)}))
        break
    return out
