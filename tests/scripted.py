"""A scripted HTTP/1.1 server on loopback for the HTTP clients' tests: each answer (or a
dropped connection) is the test's, so what the client sends and how it takes each failure can
be checked byte for byte."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

Handler = Callable[[bytes, int], bytes | None]


class Scripted:
    """A server that answers each request with ``handler(request, n)``; None: close unanswered."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[bytes] = []
        self.connections = 0
        self.open = 0  # connections open now
        self.most_open = 0
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                answer = self.handler(head + body, len(self.requests))
                if answer is None:
                    break
                if answer == b"slow":
                    await asyncio.sleep(0.1)
                    answer = ok(b"{}")
                writer.write(answer)
                await writer.drain()
                if answer.startswith(b"HTTP/1.0") or b"connection: close" in answer.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def ok(body: bytes, *headers: bytes) -> bytes:
    extra = b"".join(h + b"\r\n" for h in headers)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)
