"""What both HTTP dialects share: one pooled client of the endpoint and the error classification.

The classification follows DashScope's error codes (the README's "Failure semantics" table
says what each leads to): it is the one place that turns statuses and codes into retry /
split / stop decisions.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping
from importlib.metadata import version
from typing import Any, NamedTuple

import aiohttp
import orjson
import structlog
from yarl import URL

from worker import httpclient
from worker.config import ProviderSettings
from worker.embedding.providers.base import (
    CONFIG_CODES,
    ConfigurationFault,
    PermanentError,
    TooManyInputs,
    TransientError,
)

log = structlog.get_logger(__name__)

# Fractional seconds are not in the RFC but some servers (and our fake) send them.
_SECONDS = re.compile(r"-?\d+(\.\d+)?")
# A server asking for more than this is treated as asking for this.
MAX_RETRY_AFTER_S = 3600.0

# A refusal of the number of texts, as servers word it: DashScope "batch size is invalid, it
# should not be larger than 10", TEI "batch size 64 > maximum allowed batch size 32", others
# "too many inputs". Words about a text's length must not match (that is the data's fault).
_TOO_MANY_INPUTS = re.compile(
    r"batch size|too many (inputs|texts|items|strings)|(array|list) (size|length)"
    r"|number of (inputs|texts)",
    re.IGNORECASE,
)
# Statuses servers use for it: 400, TEI's 413 (payload too large), 422 (validation).
_TOO_MANY_STATUSES = (400, 413, 422)


class Answer(NamedTuple):
    """A provider's whole answer: status, headers (case-insensitive) and body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class ApiClient:
    """POSTs JSON to one provider's endpoint over one aiohttp session (keep-alive, TLS,
    chunked and compressed bodies are aiohttp's), opened at the first request so that it
    belongs to the running event loop.

    At most ``2 × provider.concurrency_ceiling`` connections (the AIMD limit's ceiling, with
    room for requests outside it); an idle one is kept 15 s (aiohttp's default). The
    environment's proxy for the endpoint is looked up once (``httpclient.proxy``): aiohttp's
    ``trust_env`` looks up ``.netrc`` and the proxy variables again for every request, in two
    threads (over twice the client's CPU per request, measured), and refuses a ``.netrc``
    entry for the host beside a bearer key. The headers go with each request, not as the
    session's: aiohttp copies a session's headers into those it sends a proxy, and would send
    it the key. No cookie jar: an API with a bearer key sets none worth keeping.
    """

    def __init__(self, settings: ProviderSettings) -> None:
        assert settings.api_key is not None and settings.base_url is not None
        self._base = settings.base_url.rstrip("/")
        self._urls: dict[str, URL] = {}
        self._headers = {
            "Accept": "application/json",
            "Content-Type": "application/json",
            "User-Agent": f"embedding-worker/{version('embedding-worker')}",
            "Authorization": f"Bearer {settings.api_key.get_secret_value()}",
        }
        # As before aiohttp (httpx's Timeout): the settings' timeout for waiting for a
        # connection and between reads, at most 10 s of it to connect.
        self._timeout = httpclient.timeout(settings.timeout_s, min(10.0, settings.timeout_s))
        self._connections = settings.concurrency_ceiling * 2
        proxy = httpclient.proxy(self._base, "provider")
        self._headers.update(proxy.request_headers)
        self._proxy = proxy.kwargs()
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        self._session = httpclient.session(self._timeout, self._connections)
        return self._session

    async def post(self, path: str, payload: dict[str, Any]) -> Answer:
        """The answer, whatever its status; aiohttp's exceptions when there is none."""
        session = self._session or self._open()
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self._base + path)
        async with session.post(
            url,
            data=orjson.dumps(payload),
            headers=self._headers,
            **self._proxy,
        ) as response:
            return Answer(response.status, response.headers, await response.read())

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        return min(max(0.0, float(value)), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    delay = when.timestamp() - (time.time() if now is None else now)
    return min(max(0.0, delay), MAX_RETRY_AFTER_S)


async def post_json(client: ApiClient, path: str, payload: dict[str, Any]) -> Any:
    """POST and return the decoded body, or raise the error class that says what to do.

    No answer is transient: a timeout (to connect, for a connection, between reads) is
    ``Timeout``; any other failure (refused, reset, closed before or while answering, an
    answer that is not HTTP) is ``ConnectionError`` (``httpclient.failure``).
    """
    try:
        answer = await client.post(path, payload)
    except (TimeoutError, aiohttp.ClientError) as exc:
        code, message = httpclient.failure(exc)
        raise TransientError(message, code=code) from exc
    if answer.status == 200:
        try:
            return orjson.loads(answer.body)
        except orjson.JSONDecodeError as exc:
            raise TransientError("the provider sent a body that is not JSON") from exc
    raise classify(answer.status, answer.body, answer.headers.get("retry-after"))


def classify(status: int, body: bytes, retry_after: str | None = None) -> Exception:
    """The error class of an answer that is not a 200 (``retry_after``: its header)."""
    code, message = _error_body(body)
    text = f"HTTP {status} {code or ''}: {message}".strip()
    if code in CONFIG_CODES or status in (401, 403, 404):
        return ConfigurationFault(text, code=code or str(status), status=status)
    if status == 429 or status >= 500 or status == 408:
        return TransientError(
            text,
            code=code or str(status),
            retry_after=parse_retry_after(retry_after),
            status=status,
        )
    if status in _TOO_MANY_STATUSES and _TOO_MANY_INPUTS.search(message):
        return TooManyInputs(text, code=code or str(status), status=status)
    lowered = message.lower()
    if status == 400 and ("dimension" in lowered or "model" in lowered):
        # A parameter the worker sends for every request: its configuration, not the data.
        return ConfigurationFault(text, code=code or "InvalidParameter", status=status)
    return PermanentError(text, code=code or str(status), status=status)


def _error_body(body: bytes) -> tuple[str | None, str]:
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, body.decode("utf-8", "replace")[:300]
    if not isinstance(decoded, dict):
        return None, str(decoded)[:300]
    nested = decoded.get("error")
    error: dict[str, Any] = nested if isinstance(nested, dict) else decoded
    code = error.get("code") or error.get("type")
    message = error.get("message") or ""
    return (str(code) if code else None), str(message)[:500]
