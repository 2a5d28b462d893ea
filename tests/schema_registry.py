"""A schema registry for the tests: the subset of the Confluent REST API the worker and a
producer use, served over real HTTP on loopback, with faults to inject.

Alone it answers from memory. In front of a real registry (``upstream``: Apicurio Registry
from worker/tools/devstack/registry.py) it forwards every request and only adds the faults:
the schemas, ids and answers (a 404 with ``error_code`` 40403 for an unknown id) are then the
real registry's. Karapace has no distribution on PyPI (``pip install karapace`` finds none).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
from typing import Any

import fastavro
import httpx

SUBJECT_VERSIONS = re.compile(r"^/subjects/([^/]+)/versions$")
SCHEMA_BY_ID = re.compile(r"^/schemas/ids/(\d+)$")


class SchemaRegistry:
    """``POST /subjects/{subject}/versions`` registers (the same schema keeps its id) and
    ``GET /schemas/ids/{id}`` answers (``?format=serialized``: the FileDescriptorProto that
    ``register`` was given for a Protobuf schema, else the text, as a registry that ignores
    ``format`` does; a real registry compiles it). Faults: ``stop()`` (down: connections
    refused), ``failing`` (answer with that status), ``delay_s``."""

    def __init__(self, upstream: str | None = None) -> None:
        self.upstream = upstream
        self.schemas: list[dict[str, Any]] = []
        self.serialized: dict[int, str] = {}
        self.failing: int | None = None
        self.delay_s = 0.0
        self.requests = 0
        self.under_way = 0  # requests read, not yet answered
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen (on the same port as before, after a ``stop``)."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def register(self, schema: str, schema_type: str = "AVRO", serialized: bytes = b"") -> int:
        """The schema's id; the same schema keeps its id. ``serialized`` (the compiled
        FileDescriptorProto) only serves the fake: a real registry compiles the text."""
        if self.upstream is not None:
            # A subject per schema, as a producer's TopicNameStrategy would give each topic.
            subject = "s-" + hashlib.sha256(schema.encode()).hexdigest()[:16] + "-value"
            response = httpx.post(
                f"{self.upstream}/subjects/{subject}/versions",
                json={"schema": schema, "schemaType": schema_type},
                headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
            )
            response.raise_for_status()
            return int(response.json()["id"])
        entry = {"schema": schema, "schemaType": schema_type}
        if entry not in self.schemas:
            self.schemas.append(entry)
        id = self.schemas.index(entry) + 1
        if serialized:
            self.serialized[id] = base64.b64encode(serialized).decode()
        return id

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length) if length else b""
            # A request's faults are those set when it arrived, so that a test changing them
            # never changes a request already under way (``settled`` waits those out).
            delay, failing = self.delay_s, self.failing
            self.under_way += 1
            try:
                if delay:
                    await asyncio.sleep(delay)
                status, answer = await self._route(method, path, body, failing)
            finally:
                self.under_way -= 1
            data = json.dumps(answer).encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: application/vnd.schemaregistry.v1+json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _route(
        self, method: str, target: str, body: bytes, failing: int | None
    ) -> tuple[str, dict[str, Any]]:
        path, _, query = target.partition("?")
        if failing is not None:
            return f"{failing} Failing", {"error_code": failing, "message": "injected"}
        if self.upstream is not None:
            return await self._forward(method, target, body)
        if method == "POST" and (m := SUBJECT_VERSIONS.match(path)):
            request = json.loads(body)
            schema, schema_type = request["schema"], request.get("schemaType", "AVRO")
            problem = _invalid(schema, schema_type)
            if problem is not None:
                return "422 Unprocessable Entity", {"error_code": 42201, "message": problem}
            return "200 OK", {"id": self.register(schema, schema_type)}
        if method == "GET" and (m := SCHEMA_BY_ID.match(path)):
            id = int(m.group(1))
            if not 1 <= id <= len(self.schemas):
                return "404 Not Found", {"error_code": 40403, "message": "Schema not found"}
            entry = self.schemas[id - 1]
            # As Confluent's and Apicurio's: no schemaType for Avro, the default type.
            answer = {"schema": entry["schema"], "references": []}
            if entry["schemaType"] != "AVRO":
                answer["schemaType"] = entry["schemaType"]
            if query == "format=serialized" and id in self.serialized:
                answer["schema"] = self.serialized[id]
            return "200 OK", answer
        return "404 Not Found", {"error_code": 404, "message": "not in this test registry"}

    async def _forward(self, method: str, target: str, body: bytes) -> tuple[str, dict[str, Any]]:
        assert self.upstream is not None
        async with httpx.AsyncClient() as client:
            response = await client.request(
                method,
                self.upstream + target,
                content=body,
                headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
            )
        return f"{response.status_code} {response.reason_phrase}", response.json()


def _invalid(schema: str, schema_type: str) -> str | None:
    """Why a registry refuses to register ``schema`` (422, error code 42201), if it does: an
    Avro or JSON schema must parse (Protobuf text is not checked here)."""
    if schema_type not in ("AVRO", "JSON"):
        return None
    try:
        parsed = json.loads(schema)
        if schema_type == "AVRO":
            fastavro.parse_schema(parsed)
    except Exception as exc:
        return f"Invalid schema: {exc}"
    return None
