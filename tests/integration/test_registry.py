"""Schema-registry formats: Avro, JSON Schema and Protobuf in the Confluent wire format, schemas
from a registry on loopback; a registry that cannot answer is waited for, bytes that do not
fit their schema are dead letters (`schema_mismatch`).

The registry is the test one (tests/schema_registry.py) on its own, or, where
``EMBEDDING_WORKER_DEVSTACK_REGISTRY=apicurio`` (the default of ``make test-kafka``), the same
in front of a real Apicurio Registry (worker/tools/devstack/registry.py), adding only faults.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import io
import json
import os
import struct
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastavro
import httpx
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2
from prometheus_client import generate_latest

from fakeapi import FakeEmbeddingServer
from tests.conftest import Env, broker_kind, dashscope, migrate_db, running, wait_until
from tests.schema_registry import SchemaRegistry
from worker.config import ConfigError, FieldMap, InputFormat, InputSettings, load_settings
from worker.events import DeadLetter, Reason
from worker.model import Change, Record
from worker.pipeline.decode import Limits, decode
from worker.pipeline.formats import Ignored
from worker.pipeline.registry import Schemas, schema_id
from worker.tools.devstack.registry import ApicurioRegistry
from worker.tools.produce import check_file

TS_MS = 1_796_083_200_000  # 2026-12-01: the record time, after every event time here
ARTICLE = {
    "type": "record",
    "name": "Article",
    "fields": [
        {"name": "uid", "type": "long"},
        {"name": "body", "type": "string"},
        {"name": "updated", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "thumbnail", "type": ["null", "bytes"], "default": None},
    ],
}
FIELDS: dict[str, Any] = {
    "id": "uid",
    "text": "body",
    "timestamp": "updated",
    "metadata_fields": ["thumbnail"],
}
ARTICLE_JSON = {
    "type": "object",
    "properties": {"id": {"type": "string"}, "text": {"type": "string", "minLength": 1}},
    "required": ["id", "text"],
}
UPDATED = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
# article_proto() as a producer writes it: what a real registry is given (it compiles it).
ARTICLE_PROTO = """syntax = "proto3";
package shop;

import "google/protobuf/timestamp.proto";

message Article {
  int64 uid = 1;
  string body = 2;
  google.protobuf.Timestamp updated = 3;
  message Tag {
    string name = 1;
  }
}

message Other {
  string id = 1;
  string text = 2;
}
"""
REGISTRY_ENV = "EMBEDDING_WORKER_DEVSTACK_REGISTRY"

pytestmark = pytest.mark.schema_registry


def registry_kind() -> str:
    """``fake`` or ``apicurio``; by default the real one where the broker is Apache Kafka."""
    default = "fake" if broker_kind() == "tansu" else "apicurio"
    kind = os.environ.get(REGISTRY_ENV, "").strip().lower() or default
    if kind not in ("fake", "apicurio"):
        raise RuntimeError(f"{REGISTRY_ENV}={kind!r}: expected fake or apicurio")
    return kind


@pytest.fixture(scope="session")
async def apicurio(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str | None]:
    """The real registry's URL, started once per session; None when the fake serves alone."""
    if registry_kind() == "fake":
        yield None
        return
    server = ApicurioRegistry()
    await server.start(tmp_path_factory.mktemp("schema-registry"))
    try:
        yield server.url
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def serving(upstream: str | None) -> AsyncIterator[SchemaRegistry]:
    server = SchemaRegistry(upstream)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def registry(apicurio: str | None) -> AsyncIterator[SchemaRegistry]:
    async with serving(apicurio) as server:
        yield server


@pytest.fixture
async def fake_registry() -> AsyncIterator[SchemaRegistry]:
    """The test registry alone: it serves what a real one would refuse to register."""
    async with serving(None) as server:
        yield server


def framed(schema_id: int, payload: bytes) -> bytes:
    return struct.pack(">bI", 0, schema_id) + payload


def avro(schema_id: int, **row: Any) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(ARTICLE), row)
    return framed(schema_id, out.getvalue())


def article(uid: int, body: str, thumbnail: bytes | None = None) -> dict[str, Any]:
    return {"uid": uid, "body": body, "updated": UPDATED, "thumbnail": thumbnail}


def input_settings(registry: SchemaRegistry, fmt: str = "avro", **fields: Any) -> InputSettings:
    return InputSettings(
        format=InputFormat(fmt),
        fields=FieldMap(**fields),
        registry_url=registry.url,
        registry_timeout_s=1,
    )


async def limits_for(settings: InputSettings, *values: bytes) -> Limits:
    schemas = Schemas(settings)
    assert await schemas.prefetch(values, asyncio.Event())
    return Limits(
        default_namespace="default",
        max_tokens_per_text=8192,
        oversize_policy=load_settings().oversize_policy,
        max_metadata_bytes=64_000,
        input=settings,
        schemas=schemas,
    )


def record(value: bytes) -> Record:
    return Record("t", 0, 5, None, value, TS_MS)


def letter(result: Change | DeadLetter | Ignored) -> DeadLetter:
    assert isinstance(result, DeadLetter), result
    return result


# ---- wire format and decoding ----------------------------------------------------------------


def test_the_schema_id_is_read_from_the_wire_format() -> None:
    assert schema_id(framed(258, b"x")) == 258
    assert schema_id(b"\x01" + bytes(4)) is None  # another magic byte
    assert schema_id(b"\x00\x00\x01") is None  # too short for an id
    assert schema_id(b'{"id": "a"}') is None
    assert schema_id(None) is None


async def test_an_avro_record_goes_through_the_field_mapping(registry: SchemaRegistry) -> None:
    """A timestamp-millis is the version time; bytes go into the metadata as base64."""
    id = registry.register(json.dumps(ARTICLE))
    value = avro(id, **article(42, "Rates rise", thumbnail=b"\x89PNG"))
    limits = await limits_for(input_settings(registry, **FIELDS), value)
    got = decode(record(value), limits)
    assert isinstance(got, Change), got
    assert (got.id, got.text, got.event_time) == ("42", "Rates rise", UPDATED)
    assert json.loads(got.metadata_json) == {"thumbnail": base64.b64encode(b"\x89PNG").decode()}


async def test_bytes_that_do_not_fit_the_schema_are_a_schema_mismatch(
    registry: SchemaRegistry,
) -> None:
    id = registry.register(json.dumps(ARTICLE))
    good = avro(id, **article(1, "text"))
    limits = await limits_for(input_settings(registry, **FIELDS), good)
    wrong_magic = b"\x01" + good[1:]
    truncated = good[:-3]
    trailing = good + b"\x00\x00"
    for value, says in (
        (wrong_magic, "wire format"),
        (truncated, "does not fit"),
        (trailing, "past the record"),
        (b'{"uid": 1}', "wire format"),
    ):
        dead = letter(decode(record(value), limits))
        assert dead.reason is Reason.SCHEMA_MISMATCH, dead
        assert says in dead.message
        assert dead.value_b64 == base64.b64encode(value).decode()  # kept for replay


async def test_json_schema_payloads_are_validated(registry: SchemaRegistry) -> None:
    id = registry.register(json.dumps(ARTICLE_JSON), "JSON")
    valid = framed(id, json.dumps({"id": "a-1", "text": "hello"}).encode())
    invalid = framed(id, json.dumps({"id": "a-2", "text": ""}).encode())
    limits = await limits_for(input_settings(registry, "jsonschema"), valid)
    got = decode(record(valid), limits)
    assert isinstance(got, Change) and (got.id, got.text) == ("a-1", "hello")
    dead = letter(decode(record(invalid), limits))
    assert dead.reason is Reason.SCHEMA_MISMATCH and dead.message.startswith("text:")
    # A schema of another type than the format reads refuses its records.
    avro_id = registry.register(json.dumps(ARTICLE))
    other = avro(avro_id, **article(1, "x"))
    limits = await limits_for(input_settings(registry, "jsonschema"), other)
    dead = letter(decode(record(other), limits))
    assert dead.reason is Reason.SCHEMA_MISMATCH and "is AVRO" in dead.message


async def test_an_unknown_id_or_a_registry_down_is_waited_for(registry: SchemaRegistry) -> None:
    """Transient: ``prefetch`` retries (not ready meanwhile) through a 404 for an id the
    registry does not know yet, one slower than the timeout, a 503 and a registry down, until
    the id is registered and the schema comes."""
    # An id nobody has registered yet: the registry's next one (it gives ids in order).
    id = registry.register(json.dumps({**ARTICLE, "doc": f"before {uuid.uuid4()}"})) + 1
    async with httpx.AsyncClient() as client:
        unknown = await client.get(f"{registry.url}/schemas/ids/{id}")
    assert unknown.status_code == 404 and unknown.json()["error_code"] == 40403
    schemas = Schemas(input_settings(registry))  # registry_timeout_s=1
    value = avro(id, **article(1, "x"))
    stop = asyncio.Event()
    fetching = asyncio.create_task(schemas.prefetch([value], stop))

    async def retried() -> None:
        """Two more requests came and failed (none left under way with this phase's fault,
        so that the next phase's fault is the one every later request meets)."""
        seen = registry.requests
        await wait_until(lambda: _true(registry.requests >= seen + 2), 30, "no retry")
        await wait_until(lambda: _true(registry.under_way == 0), 30, "a request never ended")
        assert schemas.waiting and not fetching.done()

    await retried()  # 404: not registered yet
    assert registry.register(json.dumps({**ARTICLE, "doc": f"after {uuid.uuid4()}"})) == id
    registry.delay_s = 3.0  # well past the 1-s timeout
    await retried()  # timeouts
    registry.delay_s = 0
    registry.failing = 503
    await retried()
    registry.failing = None
    await registry.stop()  # down: connections refused
    await asyncio.sleep(0.5)
    assert schemas.waiting and not fetching.done()
    await registry.start()
    assert await asyncio.wait_for(fetching, 30)
    assert not schemas.waiting and schemas.missing([value]) == set()
    # Cached forever: no request for a known id.
    requests = registry.requests
    assert await schemas.prefetch([value], stop) and registry.requests == requests
    # A stop while waiting gives up: nothing of that fetch may be decoded.
    registry.failing = 503
    stop.set()
    assert not await schemas.prefetch([framed(99, b"")], stop)


async def test_the_registry_answers_as_a_confluent_one(registry: SchemaRegistry) -> None:
    """What the worker relies on, checked against the real registry where there is one (and
    so that the fake answers the same): an id per schema content, Avro's type left out, an
    invalid schema refused at registration (422, 42201) so no producer can use it."""
    avro_id = registry.register(json.dumps(ARTICLE))
    json_id = registry.register(json.dumps(ARTICLE_JSON), "JSON")
    assert registry.register(json.dumps(ARTICLE)) == avro_id != json_id
    async with httpx.AsyncClient(base_url=registry.url) as client:
        got = (await client.get(f"/schemas/ids/{avro_id}")).json()
        assert json.loads(got["schema"]) == ARTICLE and "schemaType" not in got
        got = (await client.get(f"/schemas/ids/{json_id}")).json()
        assert json.loads(got["schema"]) == ARTICLE_JSON and got["schemaType"] == "JSON"
        refused = await client.post(
            "/subjects/invalid-value/versions",
            json={"schema": json.dumps({"type": "record", "name": "X", "fields": "none"})},
            headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        )
    assert refused.status_code == 422 and refused.json()["error_code"] == 42201, refused.text


async def _true(value: bool) -> bool:
    return value


def article_proto() -> descriptor_pb2.FileDescriptorProto:
    """shop.Article {uid, body, updated: Timestamp, Tag {name}} and shop.Other, as a
    producer's .proto compiles to."""
    f = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="article.proto",
        package="shop",
        syntax="proto3",
        dependency=["google/protobuf/timestamp.proto"],
    )
    message = file.message_type.add(name="Article")
    message.field.add(name="uid", number=1, type=f.TYPE_INT64, label=f.LABEL_OPTIONAL)
    message.field.add(name="body", number=2, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    message.field.add(
        name="updated",
        number=3,
        type=f.TYPE_MESSAGE,
        type_name=".google.protobuf.Timestamp",
        label=f.LABEL_OPTIONAL,
    )
    tag = message.nested_type.add(name="Tag")
    tag.field.add(name="name", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    other = file.message_type.add(name="Other")
    other.field.add(name="id", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    other.field.add(name="text", number=2, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    return file


def proto_classes() -> tuple[Any, Any, Any]:
    """Article, Article.Tag and Other, the producer's classes."""
    pool = descriptor_pool.DescriptorPool()
    timestamp = descriptor_pb2.FileDescriptorProto()
    timestamp_pb2.DESCRIPTOR.CopyToProto(timestamp)
    pool.Add(timestamp)
    pool.Add(article_proto())
    get = message_factory.GetMessageClass
    return (
        get(pool.FindMessageTypeByName("shop.Article")),
        get(pool.FindMessageTypeByName("shop.Article.Tag")),
        get(pool.FindMessageTypeByName("shop.Other")),
    )


async def test_protobuf_messages_by_their_message_indexes(registry: SchemaRegistry) -> None:
    """The fake answers the serialized descriptor; Apicurio Registry 2.4 the .proto text,
    which the worker compiles: the same records decode either way."""
    proto = article_proto()
    id = registry.register(ARTICLE_PROTO, "PROTOBUF", proto.SerializeToString())
    Article, Tag, Other = proto_classes()
    first = Article(uid=42, body="Rates rise")
    first.updated.FromDatetime(UPDATED)
    values = {
        "first": framed(id, b"\x00" + first.SerializeToString()),  # [0], written as one 0
        "second": framed(id, b"\x02\x02" + Other(id="o-1", text="other").SerializeToString()),
        "nested": framed(id, b"\x04\x00\x00" + Tag(name="x").SerializeToString()),  # [0, 0]
        "no index": framed(id, b"\x02\x0a"),  # [5]: no such message
        "cut": framed(id, b"\x00" + first.SerializeToString()[:-3]),
    }
    settings = input_settings(registry, "protobuf", id="uid", text="body", timestamp="updated")
    limits = await limits_for(settings, *values.values())
    got = decode(record(values["first"]), limits)
    assert isinstance(got, Change), got
    assert (got.id, got.text, got.event_time) == ("42", "Rates rise", UPDATED)
    other = await limits_for(input_settings(registry, "protobuf"), values["second"])
    got = decode(record(values["second"]), other)
    assert isinstance(got, Change) and (got.id, got.text) == ("o-1", "other")
    dead = letter(decode(record(values["nested"]), limits))  # a Tag has no uid
    assert dead.reason is Reason.SCHEMA_VIOLATION and "uid" in dead.message
    for name in ("no index", "cut"):
        dead = letter(decode(record(values[name]), limits))
        assert dead.reason is Reason.SCHEMA_MISMATCH, (name, dead)


async def test_proto_text_is_compiled_and_text_that_does_not_compile_is_refused(
    registry: SchemaRegistry, fake_registry: SchemaRegistry
) -> None:
    """A registry may answer ``format=serialized`` with the .proto text (Apicurio Registry
    2.4 does): the worker compiles it. Text that does not compile (no real registry would
    have accepted it: the fake serves it) refuses each record of its schema, saying why."""
    id = registry.register(ARTICLE_PROTO, "PROTOBUF")  # no descriptor: the fake answers text
    Article, _, _ = proto_classes()
    value = framed(id, b"\x00" + Article(uid=7, body="compiled").SerializeToString())
    limits = await limits_for(input_settings(registry, "protobuf", id="uid", text="body"), value)
    got = decode(record(value), limits)
    assert isinstance(got, Change) and (got.id, got.text) == ("7", "compiled")
    broken = fake_registry.register("syntax = nonsense", "PROTOBUF")
    value = framed(broken, b"\x00" + Article(uid=8, body="x").SerializeToString())
    settings = input_settings(fake_registry, "protobuf", id="uid", text="body")
    dead = letter(decode(record(value), await limits_for(settings, value)))
    assert dead.reason is Reason.SCHEMA_MISMATCH and "does not compile" in dead.message


def test_a_registry_format_needs_a_registry_url_and_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigError, match=r"needs input\.registry_url"):
        load_settings(input={"format": "avro"})
    find_spec = importlib.util.find_spec
    missing = {"fastavro", "grpc_tools"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name in missing else find_spec(name)
    )
    for fmt in ("avro", "protobuf"):
        with pytest.raises(ConfigError, match=r"embedding-worker\[registry\]"):
            load_settings(input={"format": fmt, "registry_url": "http://127.0.0.1:1"})
    load_settings(input={"format": "jsonschema", "registry_url": "http://127.0.0.1:1"})


def test_produce_refuses_a_registry_format(tmp_path: Path) -> None:
    """Its JSON lines are not in the wire format: each would be a `schema_mismatch`."""
    path = tmp_path / "events.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n')
    settings = load_settings(input={"format": "avro", "registry_url": "http://127.0.0.1:1"})
    with pytest.raises(ConfigError, match="Confluent serializer"):
        check_file(path, settings)


# ---- end to end --------------------------------------------------------------------------------


async def test_a_worker_stores_avro_events_and_dead_letters_corrupt_ones(
    env: Env, fake_api: FakeEmbeddingServer, registry: SchemaRegistry
) -> None:
    await migrate_db(env, 64)
    id = registry.register(json.dumps(ARTICLE))
    corrupt = avro(id, **article(3, "cut short"))[:-4]
    high = await env.produce_raw(
        [
            (b"1", avro(id, **article(1, "Rates rise"))),
            (b"3", corrupt),
            (b"2", avro(id, **article(2, "Markets calm", thumbnail=b"\x00\x01"))),
        ]
    )
    settings = env.settings(
        dashscope(fake_api, 64),
        input={"format": "avro", "fields": FIELDS, "registry_url": registry.url},
    )
    async with running(settings):
        await env.wait_for_offsets(high)
        [dead] = await env.dead_letters(1)
    conn = await env.connect()
    try:
        rows = await conn.fetch("SELECT id, content, metadata FROM embeddings ORDER BY id")
    finally:
        await conn.close()
    assert [(r["id"], r["content"]) for r in rows] == [("1", "Rates rise"), ("2", "Markets calm")]
    assert json.loads(rows[1]["metadata"]) == {"thumbnail": "AAE="}
    assert dead["reason"] == "schema_mismatch"
    assert base64.b64decode(dead["value_b64"]) == corrupt


async def test_a_worker_waits_for_a_registry_that_is_down(
    env: Env, fake_api: FakeEmbeddingServer, registry: SchemaRegistry
) -> None:
    """Nothing is stored, committed or dead-lettered while the registry is down; the worker
    says it is not ready; once the registry is up, every event is stored."""
    await migrate_db(env, 64)
    id = registry.register(json.dumps(ARTICLE))
    await registry.stop()
    high = await env.produce_raw(
        [(str(i).encode(), avro(id, **article(i, f"article {i}"))) for i in range(5)]
    )
    settings = env.settings(
        dashscope(fake_api, 64),
        input={"format": "avro", "fields": FIELDS, "registry_url": registry.url},
    )
    async with running(settings) as worker:

        async def waiting() -> bool:
            return worker.checks().get("schema_registry") is False

        await wait_until(waiting, 30, "the worker did not report the registry")
        metrics = generate_latest(worker.metrics.registry).decode()
        assert "embedding_worker_schema_registry_up 0.0" in metrics
        assert await env.stored_offsets() == {}
        await registry.start()
        await env.wait_for_offsets(high)
        assert worker.checks()["schema_registry"] is True
        assert worker.pipeline is not None and not worker.pipeline.stats.dead_lettered
    assert await env.dead_letters(0, seconds=2) == []
    conn = await env.connect()
    try:
        count = await conn.fetchval("SELECT count(*) FROM embeddings")
    finally:
        await conn.close()
    assert count == 5


async def test_a_worker_stores_protobuf_events(
    env: Env, fake_api: FakeEmbeddingServer, registry: SchemaRegistry
) -> None:
    await migrate_db(env, 64)
    id = registry.register(ARTICLE_PROTO, "PROTOBUF", article_proto().SerializeToString())
    Article, _, _ = proto_classes()
    bad_indexes = framed(id, b"\x02\x0a" + Article(uid=3, body="x").SerializeToString())
    high = await env.produce_raw(
        [
            (b"1", framed(id, b"\x00" + Article(uid=1, body="Rates rise").SerializeToString())),
            (b"3", bad_indexes),
            (b"2", framed(id, b"\x00" + Article(uid=2, body="Calm").SerializeToString())),
        ]
    )
    settings = env.settings(
        dashscope(fake_api, 64),
        input={
            "format": "protobuf",
            "fields": {"id": "uid", "text": "body"},
            "registry_url": registry.url,
        },
    )
    async with running(settings):
        await env.wait_for_offsets(high)
        [dead] = await env.dead_letters(1)
    conn = await env.connect()
    try:
        rows = await conn.fetch("SELECT id, content FROM embeddings ORDER BY id")
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [("1", "Rates rise"), ("2", "Calm")]
    assert dead["reason"] == "schema_mismatch" and "name no message" in dead["message"]
    assert base64.b64decode(dead["value_b64"]) == bad_indexes
