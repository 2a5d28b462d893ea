"""The batch interface's and the schema registry's requests, against scripted servers: the
credentials go where they belong (the key and basic auth to the endpoint, the proxy's user and
password to the proxy) and into no error message, log entry or repr, including aiohttp's
reprs, which hold a request's headers."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from structlog.testing import capture_logs

from tests.scripted import Scripted, ok
from worker import httpclient
from worker.config import InputFormat, InputSettings, ProviderSettings
from worker.embedding.providers.base import TransientError
from worker.embedding.providers.batch import BatchClient
from worker.pipeline.registry import RegistryUnavailable, Schemas

KEY = "sk-batch-secret"
PASSWORD = "registry-secret"
PROXY_PASSWORD = "proxy-secret"
SECRETS = (
    KEY,
    PASSWORD,
    PROXY_PASSWORD,
    base64.b64encode(f"reader:{PASSWORD}".encode()).decode(),
    base64.b64encode(f"me:{PROXY_PASSWORD}".encode()).decode(),
)
SCHEMA = {"type": "record", "name": "A", "fields": [{"name": "text", "type": "string"}]}
NOT_HTTP = b"SSH-2.0-OpenSSH_9.6\r\n\r\n"


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """An environment without proxy variables (the test sets its own)."""
    for name in ("http", "https", "all", "no"):
        monkeypatch.delenv(f"{name}_proxy", raising=False)
        monkeypatch.delenv(f"{name.upper()}_PROXY", raising=False)
    yield monkeypatch


def clean(*texts: str) -> None:
    for text in texts:
        assert not [s for s in SECRETS if s in text], text


def batch_client(url: str, timeout_s: float = 2.0) -> BatchClient:
    spec = {"kind": "openai", "base_url": url, "api_key": KEY, "timeout_s": timeout_s}
    spec |= {"model": "m", "dimension": 8}
    return BatchClient(ProviderSettings.model_validate(spec))


def schemas(url: str, **settings: object) -> Schemas:
    return Schemas(
        InputSettings.model_validate(
            {"format": InputFormat.AVRO, "registry_url": url, "registry_timeout_s": 1, **settings}
        )
    )


def framed(id: int) -> bytes:
    return b"\x00" + id.to_bytes(4, "big")


def always(reply: bytes | None, request: bytes, n: int) -> bytes | None:
    return reply


def header(request: bytes, name: bytes) -> bytes | None:
    for line in request.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


async def test_a_batch_request_names_its_key_to_the_endpoint_only(no_proxy: object) -> None:
    scripted = Scripted(lambda req, n: ok(b'{"id": "b-1", "status": "completed"}'))
    async with scripted as url:
        client = batch_client(url)
        try:
            assert (await client.status("b-1"))["status"] == "completed"
            clean(repr(client))
            scripted.handler = lambda req, n: NOT_HTTP
            with pytest.raises(TransientError) as err:
                await client.status("b-1")
        finally:
            await client.close()
    assert header(scripted.requests[0], b"authorization") == f"Bearer {KEY}".encode()
    # aiohttp's error for an answer that is not HTTP holds the request's headers in its repr
    assert err.value.code == "ConnectionError" and "ClientResponseError" in err.value.message
    clean(err.value.message, str(err.value), repr(err.value))


async def test_a_batch_timeout_is_a_timeout(no_proxy: object) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = batch_client(f"http://127.0.0.1:{port}/v1")
    client._timeout = httpclient.timeout(0.2)  # the client waits at least 60 s
    try:
        with pytest.raises(TransientError) as err:
            await client.status("b-1")
    finally:
        await client.close()
        server.close()
    assert err.value.code == "Timeout"


async def test_batch_requests_go_through_the_environments_proxy(
    no_proxy: pytest.MonkeyPatch,
) -> None:
    """An http endpoint through a proxy: the request goes to the proxy (its absolute URL),
    with the proxy's user and password as Proxy-Authorization; NO_PROXY bypasses it."""
    scripted = Scripted(lambda req, n: ok(b'{"id": "b-1", "status": "running"}'))
    async with scripted as url:
        port = urlsplit(url).port
        no_proxy.setenv("HTTP_PROXY", f"http://me:{PROXY_PASSWORD}@127.0.0.1:{port}")
        with capture_logs() as logs:
            client = batch_client("http://api.example.invalid/v1")
        try:
            assert (await client.status("b-1"))["status"] == "running"
            clean(repr(client), *map(repr, logs))
        finally:
            await client.close()
    request = scripted.requests[0]
    assert request.startswith(b"GET http://api.example.invalid/v1/batches/b-1 HTTP/1.1")
    credentials = base64.b64encode(f"me:{PROXY_PASSWORD}".encode())
    assert header(request, b"proxy-authorization") == b"Basic " + credentials
    assert header(request, b"authorization") == f"Bearer {KEY}".encode()
    no_proxy.setenv("NO_PROXY", "api.example.invalid")
    assert httpclient.proxy("http://api.example.invalid/v1", "batch") == httpclient.Proxy()


async def test_the_registry_sends_basic_auth_and_names_it_nowhere(no_proxy: object) -> None:
    answer = ok(json.dumps({"schema": json.dumps(SCHEMA)}).encode())
    scripted = Scripted(lambda req, n: answer)
    async with scripted as url:
        # From the settings, and else from the URL's user and password (as httpx took them).
        for registry in (
            schemas(url, registry_user="reader", registry_password=PASSWORD),
            schemas(url.replace("http://", f"http://reader:{PASSWORD}@")),
        ):
            assert await registry.prefetch([framed(1)], asyncio.Event())
            assert registry.missing([framed(1)]) == set()
        expected = b"Basic " + base64.b64encode(f"reader:{PASSWORD}".encode())
        assert [header(r, b"authorization") for r in scripted.requests] == [expected] * 2
        assert scripted.requests[1].startswith(b"GET /v1/schemas/ids/1 HTTP/1.1")
        # Without an answer, with one that is not HTTP (aiohttp's repr of that error holds
        # the request's headers) or with a refusal: said without the password.
        registry = schemas(url, registry_user="reader", registry_password=PASSWORD)
        refusal = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 12\r\n\r\nUnauthorized"
        errors = []
        for reply in (NOT_HTTP, None, refusal):
            scripted.handler = functools.partial(always, reply)
            with pytest.raises(RegistryUnavailable) as err:
                await registry._fetch({2})
            errors.append(str(err.value))
        # What the log says of them: a stop already set gives up after one fetch.
        stopped = asyncio.Event()
        stopped.set()
        with capture_logs() as logs:
            assert not await registry.prefetch([framed(2)], stopped)
    assert "schema 2: connection error: ClientResponseError: Bad status line" in errors[0]
    assert errors[1:] == [
        "schema 2: connection error: ServerDisconnectedError: Server disconnected",
        "schema 2: HTTP 401 Unauthorized",
    ]
    assert [e["error"] for e in logs if e["log_level"] == "warning"] == [errors[2]]
    clean(repr(registry), *errors, *map(repr, logs))


async def test_registry_requests_go_through_the_environments_proxy(
    no_proxy: pytest.MonkeyPatch,
) -> None:
    answer = ok(json.dumps({"schema": json.dumps(SCHEMA)}).encode())
    scripted = Scripted(lambda req, n: answer)
    async with scripted as url:
        port = urlsplit(url).port
        no_proxy.setenv("HTTP_PROXY", f"http://me:{PROXY_PASSWORD}@127.0.0.1:{port}")
        registry = schemas(
            "http://registry.example.invalid/ccompat",
            registry_user="reader",
            registry_password=PASSWORD,
        )
        with capture_logs() as logs:
            assert await registry.prefetch([framed(7)], asyncio.Event())
        clean(repr(registry), *map(repr, logs))
    request = scripted.requests[0]
    assert request.startswith(b"GET http://registry.example.invalid/ccompat/schemas/ids/7 ")
    credentials = base64.b64encode(f"me:{PROXY_PASSWORD}".encode())
    assert header(request, b"proxy-authorization") == b"Basic " + credentials
    basic = base64.b64encode(f"reader:{PASSWORD}".encode())
    assert header(request, b"authorization") == b"Basic " + basic


def test_a_proxys_credentials_stay_out_of_its_repr(no_proxy: pytest.MonkeyPatch) -> None:
    no_proxy.setenv("HTTPS_PROXY", f"http://me:{PROXY_PASSWORD}@proxy.example.invalid:3128")
    proxy = httpclient.proxy("https://api.example.invalid/v1", "provider")
    # An https endpoint: the credentials go in the CONNECT, not in each request.
    assert proxy.connect_headers is not None and not proxy.request_headers
    assert str(proxy.url) == "http://proxy.example.invalid:3128"
    clean(repr(proxy))
