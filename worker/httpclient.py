"""What the worker's HTTP clients share, all on aiohttp: the embedding providers
(``embedding/providers/http.py``), the batch interface (``embedding/providers/batch.py``) and
the schema registry (``pipeline/registry.py``).

The environment's proxy is looked up once per client, not by aiohttp's ``trust_env`` (which
looks up ``.netrc`` and the proxy variables again for every request, in two threads). Callers
send their credentials as each request's headers, never as the session's: aiohttp copies a
session's headers into those it sends a proxy. A failure without an answer is described
without aiohttp's reprs, which hold the request's headers.
"""

from __future__ import annotations

import base64
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog
from yarl import URL

log = structlog.get_logger(__name__)


def proxy_for(url: str) -> str | None:
    """The proxy the environment names for ``url`` (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, in
    either case, less NO_PROXY), as ``httpx.AsyncClient`` would have used it."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy


@dataclass(frozen=True, slots=True)
class Proxy:
    """The proxy of one endpoint, if any, and its URL's user and password as a
    Proxy-Authorization header (aiohttp takes them no other way but a deprecated one): in the
    CONNECT of an https endpoint (``connect_headers``), which is all aiohttp sends a proxy's
    headers in, else in each request (``request_headers``). Credentials stay out of the repr."""

    url: URL | None = None
    connect_headers: dict[str, str] | None = field(default=None, repr=False)
    request_headers: dict[str, str] = field(default_factory=dict, repr=False)

    def kwargs(self) -> dict[str, Any]:
        """The arguments of a request through it."""
        return {"proxy": self.url, "proxy_headers": self.connect_headers}


def proxy(base: str, who: str) -> Proxy:
    """The environment's proxy for the endpoint ``base`` (``who``: what the log calls it)."""
    found = proxy_for(base)
    if found is None:
        return Proxy()
    url = URL(found)
    log.info(f"{who} requests go through a proxy", proxy=url.host)
    if url.user is None:
        return Proxy(url)
    pair = f"{url.user}:{url.password or ''}".encode()
    credentials = {"Proxy-Authorization": "Basic " + base64.b64encode(pair).decode()}
    if urlsplit(base).scheme == "https":
        return Proxy(url.with_user(None), connect_headers=credentials)
    return Proxy(url.with_user(None), request_headers=credentials)


def timeout(seconds: float, connect_s: float | None = None) -> aiohttp.ClientTimeout:
    """``httpx.Timeout(seconds, connect=connect_s)`` as aiohttp has it: ``seconds`` to wait
    for a connection and between reads, ``connect_s`` (default ``seconds``) to connect."""
    return aiohttp.ClientTimeout(
        total=None,
        connect=seconds,
        sock_connect=seconds if connect_s is None else connect_s,
        sock_read=seconds,
    )


def session(client_timeout: aiohttp.ClientTimeout, connections: int = 100) -> aiohttp.ClientSession:
    """A session of at most ``connections`` connections; to be opened on the running loop.
    No cookie jar: the worker's endpoints authenticate each request."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=client_timeout,
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def failure(exc: TimeoutError | aiohttp.ClientError) -> tuple[str, str]:
    """The code (``Timeout`` or ``ConnectionError``) and message of a request without an
    answer. aiohttp's timeouts are ``TimeoutError``s (some also ``ClientError``s), so they are
    told apart first. A ``ClientResponseError`` here is an answer that is not HTTP or a
    proxy's refusal; its repr holds the request's headers, so only its message is said."""
    if isinstance(exc, TimeoutError):
        return "Timeout", f"timeout: {type(exc).__name__}"
    what = exc.message if isinstance(exc, aiohttp.ClientResponseError) else str(exc)
    return "ConnectionError", f"connection error: {type(exc).__name__}: {what}"
