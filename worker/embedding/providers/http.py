"""What both HTTP dialects share: one pooled client of the endpoint and the error classification.

The classification follows DashScope's error codes (the README's "Failure semantics" table
says what each leads to): it is the one place that turns statuses and codes into retry /
split / stop decisions.
"""

from __future__ import annotations

import email.utils
import re
import time
import urllib.request
from importlib.metadata import version
from typing import Any

import httpx
import orjson
import structlog

from worker.config import ProviderSettings
from worker.embedding.providers.base import (
    ConfigurationFault,
    PermanentError,
    TooManyInputs,
    TransientError,
)
from worker.embedding.providers.transport import LeanTransport

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

# Codes that mean "your account or key", whatever status carries them.
CONFIG_CODES = {"InvalidApiKey", "AccessDenied", "Arrearage", "Model.AccessDenied"}


class ApiClient:
    """POSTs JSON to one provider's endpoint through :class:`LeanTransport` (or, when the
    environment names a proxy for it, httpx's own transport).

    Why not ``httpx.AsyncClient``: per request it merged and re-parsed the URL, rebuilt the
    headers and ran its cookie, auth and redirect machinery, none of which an API with a
    bearer key uses: ~30 % of the worker's CPU per embedding request (benchmark scenario 1).
    Here the URL and headers are built once; requests and responses are still httpx's
    types and failures httpx's exceptions, so the error classification below is unchanged.
    """

    def __init__(self, settings: ProviderSettings) -> None:
        assert settings.api_key is not None and settings.base_url is not None
        self._base = settings.base_url.rstrip("/")
        self._urls: dict[str, httpx.URL] = {}
        self._headers = httpx.Headers(
            {
                "Accept": "application/json",
                "Content-Type": "application/json",
                "User-Agent": f"embedding-worker/{version('embedding-worker')}",
                "Authorization": f"Bearer {settings.api_key.get_secret_value()}",
            }
        )
        timeout = httpx.Timeout(settings.timeout_s, connect=min(10.0, settings.timeout_s))
        self._extensions = {"timeout": timeout.as_dict()}
        connections = settings.concurrency_ceiling * 2
        proxy = proxy_for(httpx.URL(self._base))
        self._transport: httpx.AsyncBaseTransport
        if proxy is None:
            self._transport = LeanTransport(max_connections=connections)
        else:
            # The lean transport speaks no proxy protocol; httpx's own transport does.
            log.info("provider requests go through a proxy", proxy=httpx.URL(proxy).host)
            self._transport = httpx.AsyncHTTPTransport(
                proxy=proxy, limits=httpx.Limits(max_connections=connections)
            )

    async def post(self, path: str, payload: dict[str, Any]) -> httpx.Response:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self._base + path)
        body = orjson.dumps(payload)
        request = httpx.Request(
            "POST", url, headers=self._headers, content=body, extensions=self._extensions
        )
        response = await self._transport.handle_async_request(request)
        await response.aread()
        return response

    async def aclose(self) -> None:
        await self._transport.aclose()


def proxy_for(url: httpx.URL) -> str | None:
    """The proxy the environment names for ``url`` (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, in
    either case, less NO_PROXY), as ``httpx.AsyncClient`` would have used it."""
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(url.host):
        return None
    return proxy


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
    """POST and return the decoded body, or raise the error class that says what to do."""
    try:
        response = await client.post(path, payload)
    except httpx.TimeoutException as exc:
        raise TransientError(f"timeout: {type(exc).__name__}", code="Timeout") from exc
    except httpx.TransportError as exc:
        raise TransientError(f"connection error: {exc!r}", code="ConnectionError") from exc
    if response.status_code == 200:
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise TransientError("the provider sent a body that is not JSON") from exc
    raise classify(response)


def classify(response: httpx.Response) -> Exception:
    status = response.status_code
    code, message = _error_body(response)
    text = f"HTTP {status} {code or ''}: {message}".strip()
    if code in CONFIG_CODES or status in (401, 403, 404):
        return ConfigurationFault(text, code=code or str(status), status=status)
    if status == 429 or status >= 500 or status == 408:
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        return TransientError(
            text, code=code or str(status), retry_after=retry_after, status=status
        )
    if status in _TOO_MANY_STATUSES and _TOO_MANY_INPUTS.search(message):
        return TooManyInputs(text, code=code or str(status), status=status)
    lowered = message.lower()
    if status == 400 and ("dimension" in lowered or "model" in lowered):
        # A parameter the worker sends for every request: its configuration, not the data.
        return ConfigurationFault(text, code=code or "InvalidParameter", status=status)
    return PermanentError(text, code=code or str(status), status=status)


def _error_body(response: httpx.Response) -> tuple[str | None, str]:
    try:
        body = response.json()
    except ValueError:
        return None, response.text[:300]
    if not isinstance(body, dict):
        return None, str(body)[:300]
    nested = body.get("error")
    error: dict[str, Any] = nested if isinstance(nested, dict) else body
    code = error.get("code") or error.get("type")
    message = error.get("message") or ""
    return (str(code) if code else None), str(message)[:500]
