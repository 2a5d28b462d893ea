"""Schema-registry formats: Avro, JSON Schema and Protobuf in the Confluent wire format.

A record's value is a magic byte 0, the schema id (4 bytes, big-endian), then the payload
(Avro binary; JSON; or, for Protobuf, the message indexes as zigzag varints then the message).
Schemas come from a registry speaking the Confluent REST API (``GET /schemas/ids/{id}``); an
id's schema never changes, so each is fetched once and kept.

Fetching is async and ``decode`` is not: the pipeline awaits ``Schemas.prefetch`` for each
fetch before decoding it, so decoding only reads memory. An id the registry does not know
(yet) and a registry that cannot answer are transient: ``prefetch`` retries until it has
every schema of the fetch. Bytes that do not fit their schema are refused as
``schema_mismatch``, a dead letter like any other refusal.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import math
import struct
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from importlib.metadata import version
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

import structlog

from worker import backoff
from worker.config import InputFormat, InputSettings
from worker.events import Reason
from worker.jsonvalue import Rejected, check_strings, json_object

if TYPE_CHECKING:
    from worker.httpclient import Proxy

log = structlog.get_logger(__name__)

MAGIC = 0
HEADER = struct.Struct(">bI")  # magic byte, schema id
# The registry's names of the schema types, per input format.
SCHEMA_TYPES = {
    InputFormat.AVRO: "AVRO",
    InputFormat.JSONSCHEMA: "JSON",
    InputFormat.PROTOBUF: "PROTOBUF",
}
# Protobuf schemas are asked for as a FileDescriptorProto (base64): the protobuf package
# builds message classes from descriptors, it does not parse .proto text. A registry that
# answers the text anyway has it compiled by protoc (_compile_proto).
SERIALIZED = {"format": "serialized"}
MAX_RETRY_DELAY_S = 10.0

Reader = Callable[[bytes], Any]


class RegistryUnavailable(Exception):
    """The registry could not give a schema now (down, 5xx, timeout, or an unknown id)."""


@dataclass(frozen=True, slots=True)
class Schema:
    id: int
    type: str  # the registry's schemaType: AVRO, JSON or PROTOBUF
    read: Reader  # payload -> value; raises Rejected(SCHEMA_MISMATCH)


def schema_id(value: bytes | None) -> int | None:
    """The schema id of a value in the wire format, or None when it is not in it."""
    if value is None or len(value) < HEADER.size or value[0] != MAGIC:
        return None
    return int(HEADER.unpack_from(value)[1])


def mismatch(message: str) -> Rejected:
    return Rejected(Reason.SCHEMA_MISMATCH, message)


class Schemas:
    """The schemas of one registry, by id, fetched on demand and kept."""

    def __init__(self, settings: InputSettings) -> None:
        if settings.registry_url is None:
            raise ValueError("input.registry_url is not set")
        self.settings = settings
        self.expected = SCHEMA_TYPES[settings.format]
        self._known: dict[int, Schema] = {}
        self._base, self._headers = _endpoint(settings)
        self._proxy: Proxy | None = None  # looked up at the first fetch
        # True while a fetch waits for the registry: the worker is not ready meanwhile.
        self.waiting = False

    def missing(self, values: Iterable[bytes | None]) -> set[int]:
        return {i for v in values if (i := schema_id(v)) is not None and i not in self._known}

    async def prefetch(self, values: Iterable[bytes | None], stop: asyncio.Event) -> bool:
        """Fetch every schema ``values`` name that is not known yet, retrying with backoff
        while the registry cannot give one. False if ``stop`` was set before they were all
        fetched (then nothing of this fetch may be decoded)."""
        ids = self.missing(values)
        attempt = 0
        while ids := {i for i in ids if i not in self._known}:
            try:
                await self._fetch(ids)
            except RegistryUnavailable as exc:
                self.waiting = True
                delay = backoff.capped(attempt, 0.1, MAX_RETRY_DELAY_S)
                attempt += 1
                log.warning("schema registry unavailable, retrying", error=str(exc), delay_s=delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    return False
        if self.waiting:
            log.info("schema registry reachable again")
            self.waiting = False
        return True

    async def _fetch(self, ids: set[int]) -> None:
        # Imported here: a worker without a registry format never loads the HTTP client.
        import aiohttp

        from worker import httpclient

        if self._proxy is None:
            self._proxy = httpclient.proxy(self._base, "schema registry")
        headers = {**self._headers, **self._proxy.request_headers}
        timeout = httpclient.timeout(self.settings.registry_timeout_s)
        async with httpclient.session(timeout) as session:
            for id in sorted(ids):
                try:
                    async with session.get(
                        f"{self._base}/schemas/ids/{id}",
                        params=SERIALIZED if self.expected == "PROTOBUF" else None,
                        headers=headers,
                        allow_redirects=False,
                        **self._proxy.kwargs(),
                    ) as response:
                        status, content = response.status, await response.read()
                except (TimeoutError, aiohttp.ClientError) as exc:
                    _, message = httpclient.failure(exc)
                    raise RegistryUnavailable(f"schema {id}: {message}") from None
                if status != 200:
                    # 404 too: a producer may have registered it in a registry not yet
                    # replicated here; a dead letter would lose every record of the id.
                    said = content.decode("utf-8", "replace")[:200]
                    raise RegistryUnavailable(f"schema {id}: HTTP {status} {said}")
                try:
                    body = json.loads(content)
                    text, type_ = body["schema"], body.get("schemaType", "AVRO")
                except (ValueError, KeyError, TypeError):
                    raise RegistryUnavailable(f"schema {id}: not a registry's answer") from None
                self._known[id] = Schema(id, type_, self._reader(id, type_, text))
                log.info("schema fetched", schema_id=id, type=type_)

    def _reader(self, id: int, type_: str, text: str) -> Reader:
        """How to read payloads of schema ``id``. A schema that cannot be used refuses
        each of its records (a dead letter), as the registry will not change it."""
        if type_ != self.expected:
            fmt = self.settings.format.value
            return _refuse(f"schema {id} is {type_}; input.format {fmt} reads {self.expected}")
        try:
            readers = {"AVRO": _avro_reader, "JSON": _json_reader, "PROTOBUF": _protobuf_reader}
            return readers[type_](text)
        except Exception as exc:  # the registry accepted it; we cannot read it
            return _refuse(f"schema {id} cannot be used: {exc!r}"[:500])

    def decode(self, value: bytes) -> dict[str, Any]:
        """The record that ``value`` holds, with Postgres-safe strings; ``Rejected`` when
        it is not in the wire format or does not fit its schema. Its schema must have
        been fetched (``prefetch``)."""
        id = schema_id(value)
        if id is None:
            head = value[:1].hex() or "nothing"
            raise mismatch(
                f"not in the schema-registry wire format (magic byte 0 and a schema id): "
                f"starts with {head}, {len(value)} bytes"
            )
        schema = self._known.get(id)
        if schema is None:  # prefetch makes this unreachable from the pipeline
            raise RegistryUnavailable(f"schema {id} was not fetched")
        data = schema.read(value[HEADER.size :])
        if not isinstance(data, dict):
            raise Rejected(
                Reason.SCHEMA_VIOLATION,
                f"the value must be a record (an object), not {type(data).__name__}",
            )
        check_strings(data)
        return data


def _endpoint(settings: InputSettings) -> tuple[str, dict[str, str]]:
    """The registry's base URL without credentials, and the headers of each request: basic
    auth from ``registry_user`` and ``registry_password``, else from the URL's user and
    password (as httpx took them), UTF-8 encoded. Sent with each request, never as a
    session's headers, which aiohttp would send a proxy too."""
    assert settings.registry_url is not None
    parts = urlsplit(settings.registry_url.rstrip("/"))
    user, password = settings.registry_user, settings.registry_password
    pair = None
    if user is not None:
        pair = f"{user}:{'' if password is None else password.get_secret_value()}"
    elif parts.username is not None or parts.password is not None:
        pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    host = parts.netloc.rpartition("@")[2]
    base = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    headers = {"User-Agent": f"embedding-worker/{version('embedding-worker')}"}
    if pair is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    return base, headers


def _refuse(problem: str) -> Reader:
    def read(payload: bytes) -> Any:
        raise mismatch(problem)

    return read


def _avro_reader(text: str) -> Reader:
    import fastavro

    schema = fastavro.parse_schema(json.loads(text))

    def read(payload: bytes) -> Any:
        stream = io.BytesIO(payload)
        try:
            value = fastavro.schemaless_reader(stream, schema, None)
        except Exception as exc:  # truncated, or bytes of another schema
            raise mismatch(f"the Avro payload does not fit its schema: {exc!r}"[:500]) from None
        if stream.tell() != len(payload):
            raise mismatch(
                f"the Avro payload has {len(payload) - stream.tell()} bytes past the record "
                "its schema describes"
            )
        return value

    return read


def _json_reader(text: str) -> Reader:
    from jsonschema import validators
    from jsonschema.exceptions import best_match

    schema = json.loads(text)
    cls = validators.validator_for(schema)
    cls.check_schema(schema)
    validator = cls(schema)

    def read(payload: bytes) -> Any:
        value = json_object(payload, "the value")
        error = best_match(validator.iter_errors(value))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "the value"
            raise mismatch(f"{where}: {error.message}"[:500])
        return value

    return read


def _protobuf_reader(text: str) -> Reader:
    import importlib

    from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
    from google.protobuf.message import DecodeError

    try:
        file = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(text, validate=True))
    except binascii.Error:  # not base64: the .proto text (the registry ignored the format)
        file = _compile_proto(text)
    pool = descriptor_pool.DescriptorPool()
    for dependency in file.dependency:  # the well-known types only (no schema references)
        module = dependency.removesuffix(".proto").replace("/", ".") + "_pb2"
        if not module.startswith("google.protobuf."):
            raise ValueError(f"imports {dependency}: schema references are not supported")
        found = importlib.import_module(module).DESCRIPTOR
        proto = descriptor_pb2.FileDescriptorProto()
        found.CopyToProto(proto)
        pool.Add(proto)
    pool.Add(file)
    top = pool.FindFileByName(file.name).message_types_by_name
    messages = [top[m.name] for m in file.message_type]
    classes: dict[tuple[int, ...], Any] = {}

    def read(payload: bytes) -> Any:
        indexes, start = _message_indexes(payload)
        cls = classes.get(indexes)
        if cls is None:
            try:
                descriptor = messages[indexes[0]]
                for i in indexes[1:]:
                    descriptor = descriptor.nested_types[i]
            except IndexError:
                raise mismatch(f"message indexes {list(indexes)} name no message") from None
            cls = classes[indexes] = message_factory.GetMessageClass(descriptor)
        message = cls()
        try:
            message.ParseFromString(payload[start:])
        except DecodeError as exc:
            raise mismatch(f"the Protobuf payload does not fit its schema: {exc}"[:500]) from None
        return json_format.MessageToDict(message, preserving_proto_field_name=True)

    return read


def _compile_proto(text: str) -> Any:
    """The FileDescriptorProto of ``.proto`` text, compiled by protoc (from grpcio-tools),
    for a registry that answers the text though asked for ``format=serialized``: Apicurio
    Registry 2.x does. It may import the well-known types, which grpcio-tools ships."""
    import importlib.resources
    import tempfile
    from pathlib import Path

    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    include = importlib.resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "schema.proto").write_text(text, "utf-8")
        out = Path(tmp, "schema.desc")
        code = protoc.main(
            ["protoc", f"-I{tmp}", f"-I{include}", f"--descriptor_set_out={out}", "schema.proto"]
        )
        if code != 0:
            raise ValueError(f"its .proto text does not compile (protoc exit {code})")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return files[0]


def _message_indexes(payload: bytes) -> tuple[tuple[int, ...], int]:
    """Which message of the schema (a path through nested types), and where it starts:
    a count then the indexes, zigzag varints; a count of 0 stands for [0]."""
    count, pos = _varint(payload, 0)
    if count == 0:
        return (0,), pos
    if not 0 < count <= 64:
        raise mismatch(f"{count} message indexes")
    indexes = []
    for _ in range(count):
        index, pos = _varint(payload, pos)
        if index < 0:
            raise mismatch(f"message index {index}")
        indexes.append(index)
    return tuple(indexes), pos


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while shift < 64:
        if pos >= len(data):
            raise mismatch("the Protobuf message indexes are cut short")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
    raise mismatch("a Protobuf message index is not a varint")


def jsonable(value: Any) -> Any:
    """A decoded Avro value as JSON for the metadata column: times and dates in ISO-8601,
    decimals and UUIDs as strings, bytes as base64 (JSON has no bytes)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, float) and not math.isfinite(value):
        raise Rejected(Reason.SCHEMA_VIOLATION, f"metadata holds {value}, which JSON cannot")
    return value
