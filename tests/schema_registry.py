"""A schema registry for the tests: the subset of the Confluent REST API the worker and a
producer use, served over real HTTP on loopback, with faults to inject.

Not a real registry: Karapace has no distribution on PyPI (``pip install karapace`` finds
none), and Apicurio Registry from Maven Central (a Quarkus application) was not tried.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
from typing import Any

SUBJECT_VERSIONS = re.compile(r"^/subjects/([^/]+)/versions$")
SCHEMA_BY_ID = re.compile(r"^/schemas/ids/(\d+)$")


class SchemaRegistry:
    """``POST /subjects/{subject}/versions`` registers (the same schema keeps its id) and
    ``GET /schemas/ids/{id}`` answers (``?format=serialized``: the FileDescriptorProto that
    ``register`` was given for a Protobuf schema; a real registry compiles it). Faults:
    ``stop()`` (down: connections refused), ``failing`` (answer with that status), ``hidden``
    (ids answered 404), ``delay_s``."""

    def __init__(self) -> None:
        self.schemas: list[dict[str, Any]] = []
        self.serialized: dict[int, str] = {}
        self.failing: int | None = None
        self.hidden: set[int] = set()
        self.delay_s = 0.0
        self.requests = 0
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
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            status, answer = self._route(method, path, body)
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

    def _route(self, method: str, target: str, body: bytes) -> tuple[str, dict[str, Any]]:
        path, _, query = target.partition("?")
        if self.failing is not None:
            return f"{self.failing} Failing", {"error_code": self.failing, "message": "injected"}
        if method == "POST" and (m := SUBJECT_VERSIONS.match(path)):
            request = json.loads(body)
            return "200 OK", {
                "id": self.register(request["schema"], request.get("schemaType", "AVRO"))
            }
        if method == "GET" and (m := SCHEMA_BY_ID.match(path)):
            id = int(m.group(1))
            if id in self.hidden or not 1 <= id <= len(self.schemas):
                return "404 Not Found", {"error_code": 40403, "message": "Schema not found"}
            if query == "format=serialized" and id in self.serialized:
                return "200 OK", {**self.schemas[id - 1], "schema": self.serialized[id]}
            return "200 OK", self.schemas[id - 1]
        return "404 Not Found", {"error_code": 404, "message": "not in this test registry"}
