"""A lean HTTP/1.1 transport for httpx: keep-alive connections on asyncio streams.

Why: benchmark scenario 1 found httpcore (with anyio) to be ~40 % of the worker's CPU at
~350 requests/s, half of it in two ``send`` system calls per request (headers, then body)
and the rest in its layers of locks, events and cancel scopes. This transport writes each
request in one ``send``, reads the answer with one ``readuntil`` and one ``readexactly``
(or the chunks of a chunked body), and keeps idle connections for reuse. Everything above
it is still httpx: the request is an ``httpx.Request``, the response is an
``httpx.Response`` (content-encoding is decoded there), and failures are httpx's own
exceptions (``ConnectTimeout``, ``ReadTimeout``, ``ConnectError``, ``ReadError``,
``RemoteProtocolError``), so the error classification in ``worker.embedding.providers.http`` holds.

It speaks only what an embeddings API needs: HTTP/1.1 (TLS for ``https``), bodies framed by
``Content-Length``, chunked, or the end of the connection; no proxies (``ApiClient`` uses
httpx's own transport when the environment names one), no HTTP/2, no upgrades.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Iterable

import httpx

_HEADER_END = b"\r\n\r\n"
_NO_BODY = {204, 304}
MAX_HEADER_BYTES = 64 * 1024


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def usable(self) -> bool:
        """An idle connection the server has not closed (as httpcore, a close not seen yet
        fails the request with a transport error, which the embed stage retries)."""
        return not (self.writer.is_closing() or self.reader.at_eof())

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()


class LeanTransport(httpx.AsyncBaseTransport):
    def __init__(self, max_connections: int = 8, ssl_context: ssl.SSLContext | None = None) -> None:
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[tuple[bytes, bytes, int], deque[_Conn]] = {}
        self._ssl = ssl_context
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported scheme {url.scheme!r}", request=request)
        port = url.port or (443 if url.scheme == "https" else 80)
        origin = (url.raw_scheme, url.raw_host, port)
        message = _serialize(request, await request.aread())
        try:
            async with asyncio.timeout(timeouts.get("pool")):
                await self._slots.acquire()
        except TimeoutError as exc:
            raise httpx.PoolTimeout("no connection slot in time", request=request) from exc
        try:
            conn = self._take(origin)
            if conn is None:
                conn = await self._connect(request, origin, timeouts.get("connect"))
            status, headers, body, keep = await self._exchange(conn, request, message, timeouts)
            if keep and not self._closed:
                self._idle.setdefault(origin, deque()).append(conn)
            else:
                conn.close()
        finally:
            self._slots.release()
        return httpx.Response(
            status,
            headers=headers,
            stream=httpx.ByteStream(body),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    def _take(self, origin: tuple[bytes, bytes, int]) -> _Conn | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have timed out
            if conn.usable():
                return conn
            conn.close()
        return None

    async def _connect(
        self, request: httpx.Request, origin: tuple[bytes, bytes, int], within_s: float | None
    ) -> _Conn:
        scheme, host, port = origin
        tls: ssl.SSLContext | None = None
        if scheme == b"https":
            if self._ssl is None:
                self._ssl = httpx.create_ssl_context()
            tls = self._ssl
        name = host.decode("ascii")
        try:
            async with asyncio.timeout(within_s):
                reader, writer = await asyncio.open_connection(
                    name,
                    port,
                    ssl=tls,
                    server_hostname=name if tls is not None else None,
                    limit=MAX_HEADER_BYTES,
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(
                f"connect to {name}:{port} timed out", request=request
            ) from exc
        except OSError as exc:
            raise httpx.ConnectError(f"connect to {name}:{port}: {exc!r}", request=request) from exc
        return _Conn(reader, writer)

    async def _exchange(
        self,
        conn: _Conn,
        request: httpx.Request,
        message: bytes,
        timeouts: dict[str, float | None],
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        """Send ``message`` and read one response; the connection is closed on any failure."""
        try:
            try:
                conn.writer.write(message)
                async with asyncio.timeout(timeouts.get("write")):
                    await conn.writer.drain()
            except TimeoutError as exc:
                raise httpx.WriteTimeout("write timed out", request=request) from exc
            except OSError as exc:
                raise httpx.WriteError(f"write failed: {exc!r}", request=request) from exc
            try:
                async with asyncio.timeout(timeouts.get("read")):
                    try:
                        head = await conn.reader.readuntil(_HEADER_END)
                    except asyncio.IncompleteReadError as exc:
                        raise httpx.RemoteProtocolError(
                            "server disconnected without sending a response", request=request
                        ) from exc
                    status, headers, keep, length, chunked = _parse_head(head, request)
                    if status in _NO_BODY:
                        body = b""
                    elif chunked:
                        body = await _read_chunked(conn.reader, request)
                    elif length is not None:
                        body = await conn.reader.readexactly(length)
                    else:
                        body = await conn.reader.read(-1)
                        keep = False
            except TimeoutError as exc:
                raise httpx.ReadTimeout("read timed out", request=request) from exc
            except asyncio.IncompleteReadError as exc:
                raise httpx.RemoteProtocolError(
                    "server disconnected in the middle of the response", request=request
                ) from exc
            except asyncio.LimitOverrunError as exc:
                raise httpx.RemoteProtocolError("response head too large", request=request) from exc
            except OSError as exc:
                raise httpx.ReadError(f"read failed: {exc!r}", request=request) from exc
        except BaseException:
            conn.close()
            raise
        return status, headers, body, keep

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        self._idle.clear()


def _serialize(request: httpx.Request, body: bytes) -> bytes:
    url = request.url
    target = url.raw_path  # path and query
    lines = [request.method.encode("ascii") + b" " + target + b" HTTP/1.1"]
    lines += [k + b": " + v for k, v in request.headers.raw]
    return b"\r\n".join(lines) + _HEADER_END + body


def _parse_head(
    head: bytes, request: httpx.Request
) -> tuple[int, list[tuple[bytes, bytes]], bool, int | None, bool]:
    """(status, headers, keep-alive, content-length, chunked) from the response head."""
    lines = head[: -len(_HEADER_END)].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise httpx.RemoteProtocolError(f"bad status line {lines[0][:100]!r}", request=request)
    version, status = parts[0], int(parts[1])
    keep = version == b"HTTP/1.1"
    length: int | None = None
    chunked = False
    headers: list[tuple[bytes, bytes]] = []
    for line in _header_lines(lines[1:]):
        name, sep, value = line.partition(b":")
        if not sep:
            raise httpx.RemoteProtocolError(f"bad header line {line[:100]!r}", request=request)
        name, value = name.strip(), value.strip()
        headers.append((name, value))
        lowered = name.lower()
        if lowered == b"content-length":
            if not value.isdigit():
                raise httpx.RemoteProtocolError("bad Content-Length", request=request)
            length = int(value)
        elif lowered == b"transfer-encoding":
            chunked = value.lower().endswith(b"chunked")
        elif lowered == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            keep = (keep and b"close" not in tokens) or (
                version == b"HTTP/1.0" and b"keep-alive" in tokens
            )
    if chunked:
        length = None
    return status, headers, keep, length, chunked


def _header_lines(lines: Iterable[bytes]) -> Iterable[bytes]:
    for line in lines:
        if line:
            yield line


async def _read_chunked(reader: asyncio.StreamReader, request: httpx.Request) -> bytes:
    parts: list[bytes] = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size_text = size_line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise httpx.RemoteProtocolError("bad chunk size", request=request) from None
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass  # trailers
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise httpx.RemoteProtocolError("bad chunk end", request=request)
