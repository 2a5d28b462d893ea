"""The lean HTTP/1.1 transport against scripted servers: framing, keep-alive, failures."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from worker.embedding.providers.transport import LeanTransport

Handler = Callable[[bytes, int], bytes | None]


class Scripted:
    """A server that answers each request head with ``handler(request, n)``; None: close."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
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
                writer.write(answer)
                await writer.drain()
                if answer.startswith(b"HTTP/1.0") or b"connection: close" in answer.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def ok(body: bytes, *headers: bytes) -> bytes:
    extra = b"".join(h + b"\r\n" for h in headers)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


@pytest.fixture
async def client_factory() -> AsyncIterator[Callable[[str], httpx.AsyncClient]]:
    clients: list[httpx.AsyncClient] = []

    def make(url: str) -> httpx.AsyncClient:
        client = httpx.AsyncClient(base_url=url, transport=LeanTransport(4), timeout=2.0)
        clients.append(client)
        return client

    yield make
    for c in clients:
        await c.aclose()


async def test_one_write_per_request_and_keep_alive(
    client_factory: Callable[[str], httpx.AsyncClient],
) -> None:
    scripted = Scripted(lambda req, n: ok(b'{"n": %d}' % n))
    async with scripted as url:
        client = client_factory(url)
        for i in range(1, 4):
            r = await client.post("/v1/embeddings?x=1", json={"input": ["a"]})
            assert r.status_code == 200 and r.json() == {"n": i}
    assert scripted.connections == 1
    first = scripted.requests[0]
    assert first.startswith(b"POST /v1/embeddings?x=1 HTTP/1.1\r\n")
    assert first.endswith(b'{"input":["a"]}')


async def test_chunked_gzip_and_error_statuses(
    client_factory: Callable[[str], httpx.AsyncClient],
) -> None:
    payload = gzip.compress(b'{"data": "' + b"x" * 5000 + b'"}')
    chunks = b"".join(
        b"%x;ext=1\r\n%s\r\n" % (len(payload[i : i + 1000]), payload[i : i + 1000])
        for i in range(0, len(payload), 1000)
    )

    def handler(req: bytes, n: int) -> bytes:
        if n == 1:
            return (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n"
                + chunks
                + b"0\r\nX-Trailer: 1\r\n\r\n"
            )
        return (
            b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 22\r\nRetry-After: 2\r\n\r\n"
            b'{"code": "Throttling"}'
        )

    async with Scripted(handler) as url:
        client = client_factory(url)
        r = await client.post("/e", json={})
        assert r.json() == {"data": "x" * 5000}
        r = await client.post("/e", json={})
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
        assert r.json() == {"code": "Throttling"}


async def test_connection_close_and_body_to_eof(
    client_factory: Callable[[str], httpx.AsyncClient],
) -> None:
    # HTTP/1.0 without a length: the body ends with the connection, which is not reused.
    scripted = Scripted(lambda req, n: b"HTTP/1.0 200 OK\r\n\r\n{}")
    async with scripted as url:
        client = client_factory(url)
        for _ in range(2):
            assert (await client.post("/e", json={})).json() == {}
        assert scripted.connections == 2
        # So is a connection the server says it closes.
        scripted.handler = lambda req, n: ok(b"[]", b"Connection: close")
        for _ in range(2):
            assert (await client.post("/e", json={})).json() == []
        assert scripted.connections == 4


async def test_server_drops_the_request_is_a_transport_error(
    client_factory: Callable[[str], httpx.AsyncClient],
) -> None:
    async with Scripted(lambda req, n: None) as url:
        client = client_factory(url)
        with pytest.raises(httpx.TransportError):
            await client.post("/e", json={})


async def test_read_timeout_and_connect_error(
    client_factory: Callable[[str], httpx.AsyncClient],
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = client_factory(f"http://127.0.0.1:{port}")
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/e", json={}, timeout=0.2)
    finally:
        server.close()
    server.close()
    await server.wait_closed()
    client = client_factory(f"http://127.0.0.1:{port}")
    with pytest.raises(httpx.ConnectError):
        await client.post("/e", json={})


async def test_a_dropped_connection_fails_once_then_a_new_one_is_used(
    client_factory: Callable[[str], httpx.AsyncClient],
) -> None:
    # Answers once per connection, then closes it (like a keep-alive timeout).
    scripted = Scripted(lambda req, n: ok(b"{}", b"Connection: keep-alive"))
    async with scripted as url:
        client = client_factory(url)
        assert (await client.post("/e", json={})).status_code == 200
        scripted.handler = lambda req, n: None
        # The drop is an error the embed stage retries (as with httpcore), never a hang.
        await asyncio.sleep(0)
        with pytest.raises(httpx.TransportError):
            await client.post("/e", json={})
        scripted.handler = lambda req, n: ok(b"{}")
        await asyncio.sleep(0.05)
        assert (await client.post("/e", json={})).status_code == 200
