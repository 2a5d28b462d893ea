"""``ApiClient`` and ``post_json`` against scripted servers: what goes over the wire, framing
and keep-alive (aiohttp's), and each failure without an answer as the cause it counts as."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.scripted import Scripted, ok
from worker.config import ProviderSettings
from worker.embedding.providers.base import TransientError
from worker.embedding.providers.http import ApiClient, post_json


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[..., ApiClient]]:
    clients: list[ApiClient] = []

    def make(url: str, **settings: Any) -> ApiClient:
        spec = {"kind": "openai", "base_url": url, "api_key": "k-1", "timeout_s": 2.0}
        client = ApiClient(ProviderSettings.model_validate({**spec, **settings}))
        clients.append(client)
        return client

    yield make
    for c in clients:
        await c.aclose()


async def cause(client: ApiClient) -> str | None:
    """The code of the transient error a request ends in."""
    with pytest.raises(TransientError) as err:
        await post_json(client, "/embeddings", {"input": ["a"]})
    assert err.value.status is None  # no answer: the cause is the failure, not a status
    assert "k-1" not in err.value.message  # the key (aiohttp puts it in some reprs)
    return err.value.code


async def test_one_request_per_post_on_one_kept_connection(
    client_for: Callable[..., ApiClient],
) -> None:
    scripted = Scripted(lambda req, n: ok(b'{"n": %d}' % n))
    async with scripted as url:
        client = client_for(url)
        for i in range(1, 4):
            assert await post_json(client, "/embeddings", {"input": ["a"]}) == {"n": i}
    assert scripted.connections == 1
    head, _, body = scripted.requests[0].partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0] == b"post /v1/embeddings http/1.1"
    assert b"authorization: bearer k-1" in lines
    assert b"content-type: application/json" in lines
    assert body == b'{"input":["a"]}'


async def test_chunked_gzip_and_an_error_status_with_retry_after(
    client_for: Callable[..., ApiClient],
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
        client = client_for(url)
        assert await post_json(client, "/e", {}) == {"data": "x" * 5000}
        with pytest.raises(TransientError) as err:
            await post_json(client, "/e", {})
    assert (err.value.status, err.value.code, err.value.retry_after) == (429, "Throttling", 2.0)


async def test_connection_close_and_body_to_eof(client_for: Callable[..., ApiClient]) -> None:
    # HTTP/1.0 without a length: the body ends with the connection, which is not reused.
    scripted = Scripted(lambda req, n: b"HTTP/1.0 200 OK\r\n\r\n{}")
    async with scripted as url:
        client = client_for(url)
        for _ in range(2):
            assert await post_json(client, "/e", {}) == {}
        assert scripted.connections == 2
        # So is a connection the server says it closes.
        scripted.handler = lambda req, n: ok(b"[]", b"Connection: close")
        for _ in range(2):
            assert await post_json(client, "/e", {}) == []
        assert scripted.connections == 4


async def test_a_server_that_closes_before_answering_is_a_connection_error(
    client_for: Callable[..., ApiClient],
) -> None:
    async with Scripted(lambda req, n: None) as url:
        assert await cause(client_for(url)) == "ConnectionError"


@pytest.mark.parametrize(
    "answer",
    [b"SSH-2.0-OpenSSH_9.6\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n", b"HTTP/1.1 200 OK\r\nX\r\n\r\n"],
    ids=["not-http", "bad-status", "bad-header"],
)
async def test_an_answer_that_is_not_http_is_a_connection_error(
    client_for: Callable[..., ApiClient], answer: bytes
) -> None:
    async with Scripted(lambda req, n: answer + b"Connection: close\r\n") as url:
        assert await cause(client_for(url)) == "ConnectionError"


async def test_a_body_cut_short_or_a_reset_is_a_connection_error(
    client_for: Callable[..., ApiClient],
) -> None:
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{}"
    async with Scripted(lambda req, n: cut) as url:
        assert await cause(client_for(url)) == "ConnectionError"

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()  # RST, as a load balancer dropping the connection

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await cause(client_for(f"http://127.0.0.1:{port}")) == "ConnectionError"
    finally:
        server.close()


async def test_a_200_that_is_not_json_is_transient_without_a_cause(
    client_for: Callable[..., ApiClient],
) -> None:
    async with Scripted(lambda req, n: ok(b"<html>maintenance</html>")) as url:
        assert await cause(client_for(url)) is None  # counted as InvalidResponse


async def test_read_timeout_and_connection_refused(client_for: Callable[..., ApiClient]) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await cause(client_for(f"http://127.0.0.1:{port}", timeout_s=0.2)) == "Timeout"
    finally:
        server.close()
    await server.wait_closed()
    assert await cause(client_for(f"http://127.0.0.1:{port}")) == "ConnectionError"


async def test_a_dropped_connection_fails_once_then_a_new_one_is_used(
    client_for: Callable[..., ApiClient],
) -> None:
    scripted = Scripted(lambda req, n: ok(b"{}", b"Connection: keep-alive"))
    async with scripted as url:
        client = client_for(url)
        assert await post_json(client, "/e", {}) == {}
        # The kept connection is closed when the next request is on it (a keep-alive
        # timeout): an error the embed stage retries, never a hang.
        scripted.handler = lambda req, n: None
        assert await cause(client) == "ConnectionError"
        scripted.handler = lambda req, n: ok(b"{}")
        assert await post_json(client, "/e", {}) == {}
    assert scripted.connections == 2


async def test_connections_are_bounded_by_twice_the_concurrency_ceiling(
    client_for: Callable[..., ApiClient],
) -> None:
    scripted = Scripted(lambda req, n: b"slow")
    async with scripted as url:
        client = client_for(url, max_concurrency=2)
        answers = await asyncio.gather(*(post_json(client, "/e", {}) for _ in range(12)))
    assert answers == [{}] * 12
    assert scripted.most_open == scripted.connections == 4
