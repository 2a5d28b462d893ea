"""``/healthz``, ``/readyz`` and ``/metrics`` on one small port.

Three fixed GET routes do not justify a web framework: this is asyncio's own server with
just enough HTTP/1.1 (one request per connection) for kubelet probes and Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = structlog.get_logger(__name__)

Checks = Callable[[], dict[str, bool]]


class ProbeServer:
    def __init__(self, registry: CollectorRegistry, checks: Checks) -> None:
        self.registry = registry
        self.checks = checks
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        self._server = await asyncio.start_server(self._handle, host, port)
        bound = int(self._server.sockets[0].getsockname()[1])
        log.info("probe server listening", host=host, port=bound)
        return bound

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            method, _, rest = request.decode("latin-1").partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            status, ctype, body = self._route(method, path)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        if path == "/healthz":
            # Answering at all proves the event loop is alive.
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            checks = self.checks()
            ready = bool(checks) and all(checks.values())
            body = json.dumps({"ready": ready, "checks": checks}).encode() + b"\n"
            status = "200 OK" if ready else "503 Service Unavailable"
            return status, "application/json", body
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
        return "404 Not Found", "text/plain", b"try /healthz, /readyz or /metrics\n"
