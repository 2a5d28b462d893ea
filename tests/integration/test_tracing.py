"""OpenTelemetry traces through the real stack (broker, Postgres, fake provider): events with a
``traceparent`` are continued, batches and transactions link them, what the worker produces
for an event carries its trace; with tracing off, nothing is recorded or added."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from fakeapi import FakeEmbeddingServer
from tests.conftest import Env, dashscope, migrate_db, running
from tests.integration.test_analysis import NEWS, one_stream
from tests.integration.test_read_side import _corpus
from tests.integration.test_recommend import wait_for_interactions
from tests.integration.test_startup_faults import assert_one_clear_line
from tests.processes import cli
from worker.config import TracingSettings
from worker.kafka.clients import make_producer

POISON = "xx-poison-xx"
Headers = list[tuple[str, bytes]]


def _traceparent(rng: random.Random) -> tuple[int, int, bytes]:
    trace_id, span_id = rng.getrandbits(128) | 1, rng.getrandbits(64) | 1
    return trace_id, span_id, f"00-{trace_id:032x}-{span_id:016x}-01".encode()


def _event(i: int, text: str | None = None) -> bytes:
    body = {"id": f"doc-{i}", "namespace": "news", "text": text or f"note {i} about trains"}
    return json.dumps(body).encode()


async def _read(env: Env, topic: str, expected: int) -> list[tuple[dict[str, Any], Headers]]:
    """A one-partition topic's JSON records with their headers (``env.dead_letters`` has no
    headers)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=env.stack.bootstrap)
    await consumer.start()
    out: list[tuple[dict[str, Any], Headers]] = []
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        deadline = asyncio.get_running_loop().time() + 30
        while len(out) < expected and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(tp, timeout_ms=300)
            out += [(json.loads(m.value), list(m.headers)) for m in batch.get(tp, [])]
    finally:
        await consumer.stop()
    return out


def _trace_of(headers: Headers) -> int | None:
    for name, value in headers:
        if name == "traceparent":
            return int(value.decode().split("-")[1], 16)
    return None


async def test_events_continue_their_trace_batches_and_transactions_link_them(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    """30 events, each with a traceparent of its own trace; one the provider refuses, one not
    JSON; some requests answered 500 (retried)."""
    fake_api.configure(poison=[POISON], rate_500=0.2, seed=7)
    await migrate_db(env, 256)
    rng = random.Random(19)
    parents: dict[int, tuple[int, int]] = {}  # event number -> (trace id, span id)
    records: list[tuple[bytes | None, bytes | None, Headers]] = []
    for i in range(30):
        trace_id, span_id, header = _traceparent(rng)
        parents[i] = (trace_id, span_id)
        value = b"{not json" if i == 5 else _event(i, f"note {i} {POISON}" if i == 9 else None)
        records.append((f"doc-{i}".encode(), value, [("traceparent", header)]))
    positions = await env.produce_records(records)
    exporter = InMemorySpanExporter()
    settings = env.settings(dashscope(fake_api), tracing={"enabled": True})
    async with running(settings, span_exporter=exporter):
        await env.wait_for_offsets(dict(positions))  # the last of each partition
    spans = exporter.get_finished_spans()

    # Each event's span continues its trace, as a child of the producer's span.
    received: dict[int, ReadableSpan] = {}
    at = {position: i for i, position in enumerate(positions)}
    for span in spans:
        if span.kind == SpanKind.CONSUMER:
            attributes = dict(span.attributes or {})
            position = (
                int(str(attributes["messaging.destination.partition.id"])),
                int(str(attributes["messaging.kafka.offset"])),
            )
            received[at[position]] = span
    assert sorted(received) == list(range(30))
    for i, span in received.items():
        assert span.context is not None and span.parent is not None
        assert (span.context.trace_id, span.parent.span_id) == parents[i]

    def linked(name: str) -> set[int]:
        return {link.context.span_id for s in spans if s.name == name for link in s.links}

    event_span = {i: s.context.span_id for i, s in received.items() if s.context is not None}
    embedded = {event_span[i] for i in range(30) if i != 5}
    assert linked("embed") == embedded, "every batch links the events it carries"
    stored = {event_span[i] for i in range(30) if i not in (5, 9)}
    assert stored <= linked("postgres transaction")

    # Retries are events of the batch spans: one per 500 answer.
    retries = [e for s in spans if s.name == "embed" for e in s.events if e.name == "retry"]
    answered_500 = fake_api.stats()["by_status"].get(500, 0)
    assert answered_500 > 0, "the fake should have answered some 500s (seeded)"
    assert len(retries) == answered_500
    assert {e.attributes["cause"] for e in retries if e.attributes} == {"500"}

    # Dead letters carry their event's trace (a child of its span).
    letters = await _read(env, env.dlq, 2)
    by_offset = {(p, o): i for i, (p, o) in enumerate(positions)}
    reasons = {}
    for letter, headers in letters:
        i = by_offset[(letter["source"]["partition"], letter["source"]["offset"])]
        reasons[i] = letter["reason"]
        assert _trace_of(headers) == parents[i][0]
    assert reasons == {5: "invalid_json", 9: "provider_rejected"}
    assert [s for s in spans if s.name == f"{env.dlq} publish"], "the produce has its span"


async def test_tracing_off_records_nothing_adds_no_header_and_needs_no_opentelemetry(
    env: Env, fake_api: FakeEmbeddingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = InMemorySpanExporter()
    _without_opentelemetry(monkeypatch)
    await migrate_db(env, 256)
    _, _, header = _traceparent(random.Random(1))
    records: list[tuple[bytes | None, bytes | None, Headers]] = [
        (b"doc-1", _event(1), [("traceparent", header)]),
        (b"doc-2", b"{not json", [("traceparent", header)]),
    ]
    positions = await env.produce_records(records)
    async with running(env.settings(dashscope(fake_api)), span_exporter=exporter):
        await env.wait_for_offsets(dict(positions))
    assert exporter.get_finished_spans() == ()
    ((letter, headers),) = await _read(env, env.dlq, 1)
    assert letter["reason"] == "invalid_json"
    assert headers == []


async def test_tracing_on_without_the_extra_exits_2_with_one_line(
    env: Env, fake_api: FakeEmbeddingServer, tmp_path: Path
) -> None:
    """``python -m worker run`` where opentelemetry cannot be imported (a package of that name
    first on the path that refuses to load, as an install without the extra would)."""
    (tmp_path / "opentelemetry").mkdir()
    (tmp_path / "opentelemetry" / "__init__.py").write_text(
        "raise ImportError('No module named opentelemetry')\n"
    )
    settings = env.worker_env(dashscope(fake_api), tracing={"enabled": True})
    code, out, err = await cli("run", PYTHONPATH=str(tmp_path), **settings)
    assert_one_clear_line(code, out, err, "tracing.enabled (EMBEDDING_WORKER_TRACING__ENABLED)")
    assert "pip install 'embedding-worker[tracing]'" in err


async def test_results_carry_their_event_trace(env: Env, tmp_path: Path) -> None:
    """Classifications (local model, analysis on) are produced with their event's trace."""
    settings, topics = await one_stream(env, tmp_path)
    rng = random.Random(3)
    traces: dict[str, int] = {}
    records: list[tuple[bytes | None, bytes | None, Headers]] = []
    for i, (_, text) in enumerate(NEWS):
        trace_id, _, header = _traceparent(rng)
        traces[f"news-{i}"] = trace_id
        value = json.dumps({"id": f"news-{i}", "namespace": "news", "text": text}).encode()
        records.append((f"news-{i}".encode(), value, [("traceparent", header)]))
    positions = await env.produce_records(records)
    exporter = InMemorySpanExporter()
    traced = settings.model_copy(update={"tracing": TracingSettings(enabled=True)})
    async with running(traced, span_exporter=exporter):
        await env.wait_for_offsets(dict(positions))
    results = await _read(env, topics["classifications_topic"], len(NEWS))
    assert {r["id"]: _trace_of(headers) for r, headers in results} == traces
    published = [s for s in exporter.get_finished_spans() if s.name.endswith(" publish")]
    assert {s.name for s in published} == {f"{topics['classifications_topic']} publish"}


def _without_opentelemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the ``tracing`` extra were not installed: importing opentelemetry fails."""
    for name in list(sys.modules):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "worker.ops.tracing", raising=False)


class _Receiver(BaseHTTPRequestHandler):
    """An OTLP/HTTP traces endpoint: keeps each POST /v1/traces body (protobuf)."""

    bodies: list[bytes]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/traces":
            self.bodies.append(body)
        self.send_response(200 if self.path == "/v1/traces" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[str, list[bytes]]]:
    bodies: list[bytes] = []
    handler = type("Handler", (_Receiver,), {"bodies": bodies})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces", bodies
    finally:
        server.shutdown()
        server.server_close()


async def test_spans_reach_an_otlp_receiver(
    env: Env, fake_api: FakeEmbeddingServer, otlp_receiver: tuple[str, list[bytes]]
) -> None:
    endpoint, bodies = otlp_receiver
    await migrate_db(env, 256)
    trace_id, _, header = _traceparent(random.Random(2))
    positions = await env.produce_records([(b"doc-1", _event(1), [("traceparent", header)])])
    tracing = {"enabled": True, "endpoint": endpoint, "sample_ratio": 1.0}
    async with running(env.settings(dashscope(fake_api), tracing=tracing)):
        await env.wait_for_offsets(dict(positions))
    # Stopping the worker flushed its spans.
    names: dict[str, int] = {}
    for body in bodies:
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource.resource.attributes}
            assert service["service.name"] == "embedding-worker"
            for scope in resource.scope_spans:
                for span in scope.spans:
                    names[span.name] = int.from_bytes(span.trace_id, "big")
    assert names[f"{env.topic} process"] == trace_id
    assert {"embed", "postgres transaction"} <= set(names)


async def test_interactions_continue_their_trace_and_each_fetch_applied_links_them(
    env: Env,
) -> None:
    """A side consumer (interactions) continues each record's ``traceparent`` like the
    pipeline, under its own group, and the fetch applied (look-ups, the transaction with
    the offsets) is one span linking them."""
    await migrate_db(env, 512)
    interactions = env.topic.replace(".events", ".interactions")
    await env.stack.create_topics([interactions, interactions + ".dlq"], partitions=1)
    settings = env.settings(
        recommend={
            "interactions_topic": interactions,
            "interactions_dlq_topic": interactions + ".dlq",
        },
        tracing={"enabled": True},
    )
    rng = random.Random(5)
    traces: dict[int, int] = {}
    exporter = InMemorySpanExporter()
    async with running(settings, span_exporter=exporter):
        await env.wait_for_offsets(await env.produce(_corpus()))
        producer = make_producer(settings.kafka)
        await producer.start()
        try:
            for item in ("space-0", "space-1", "baking-0"):
                trace_id, _, header = _traceparent(rng)
                value = json.dumps({"user": "ann", "item": item, "namespace": "news"})
                sent = await producer.send(
                    interactions,
                    key=b"ann",
                    value=value.encode(),
                    headers=[("traceparent", header)],
                )
                traces[(await sent).offset] = trace_id
        finally:
            await producer.stop()
        await wait_for_interactions(env, settings, interactions, max(traces) + 1)
    spans = exporter.get_finished_spans()
    received = {
        s.attributes["messaging.kafka.offset"]: s
        for s in spans
        if s.name == f"{interactions} process" and s.attributes is not None
    }
    assert {o: s.context.trace_id for o, s in received.items()} == traces
    groups = {(s.attributes or {}).get("messaging.consumer.group.name") for s in received.values()}
    assert groups == {f"{settings.kafka.group_id}.interactions"}
    applied = [s for s in spans if s.name == "interactions apply"]
    linked = {link.context.span_id for s in applied for link in s.links}
    assert {s.context.span_id for s in received.values()} <= linked
