"""The OpenAI-compatible batch interface (DashScope's ``/compatible-mode/v1``): about half
the real-time price, for work that can wait (a backfill).

A job is a JSONL file of ``/v1/embeddings`` requests, each named by a ``custom_id`` and
holding at most ``max_texts`` texts; it is uploaded (``/files``, purpose ``batch``), run
(``/batches``), polled with capped exponential backoff, and its output and error files are
read back. Results are placed by ``custom_id`` (a file's lines come back in any order) and a
failed line carries the error class of the real-time path (``http.classify`` of its status
and body), so the caller splits, retries or dead-letters it by the same rules.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import aiohttp
import orjson
import structlog

from worker import backoff, httpclient
from worker.config import ProviderKind, ProviderSettings
from worker.embedding.providers import dashscope
from worker.embedding.providers.base import (
    EmbeddingError,
    Embeddings,
    TransientError,
    assemble,
)
from worker.embedding.providers.http import classify
from worker.embedding.providers.openai import _decode

log = structlog.get_logger(__name__)

ENDPOINT = "/v1/embeddings"
WINDOW = "24h"
ENDED = ("completed", "failed", "expired", "cancelled")
# What a batch line of the error file says when the job ran out of time before it.
EXPIRED = "batch_expired"


class BatchFailed(EmbeddingError):
    """The job as a whole was refused (its file failed validation) or cancelled: no line ran."""


@dataclass(frozen=True, slots=True)
class Line:
    """One request of a job: at most the provider's texts per request, under one id."""

    custom_id: str
    texts: Sequence[str]


@dataclass(slots=True)
class Outcome:
    """What a finished job gave: vectors by ``custom_id``, and the lines that failed."""

    status: str
    embedded: dict[str, Embeddings] = field(default_factory=dict)
    failed: dict[str, EmbeddingError] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(e.tokens or 0 for e in self.embedded.values())


def base_url(settings: ProviderSettings) -> str:
    """Where the batch interface is: the OpenAI-compatible base, beside a native one."""
    assert settings.base_url is not None
    url = settings.base_url.rstrip("/")
    if settings.kind is ProviderKind.DASHSCOPE and url.endswith("/api/v1"):
        return url.removesuffix("/api/v1") + "/compatible-mode/v1"
    return url


class BatchClient:
    """Files and batches of one provider; each call raises the error classes of ``base``."""

    def __init__(
        self,
        settings: ProviderSettings,
        *,
        poll_initial_s: float = 2.0,
        poll_max_s: float = 60.0,
    ) -> None:
        assert settings.api_key is not None
        self.model = settings.model_name
        self.dimension = settings.dim
        self.max_texts = min(
            settings.max_texts_per_request or dashscope.MAX_TEXTS, dashscope.MAX_TEXTS
        )
        self.send_dimensions = settings.send_dimensions
        self.poll_initial_s = poll_initial_s
        self.poll_max_s = poll_max_s
        # One session, opened at the first request (on the running loop); the proxy and the
        # headers as the real-time client has them (``http.ApiClient``).
        self._base = base_url(settings)
        proxy = httpclient.proxy(self._base, "batch")
        self._proxy = proxy.kwargs()
        self._headers = {
            "Authorization": f"Bearer {settings.api_key.get_secret_value()}",
            "User-Agent": f"embedding-worker/{version('embedding-worker')}",
            **proxy.request_headers,
        }
        self._timeout = httpclient.timeout(max(settings.timeout_s, 60.0), 10.0)
        self._session: aiohttp.ClientSession | None = None

    def jsonl(self, lines: Sequence[Line]) -> bytes:
        """The job's input file; a line over ``max_texts`` is the caller's bug, caught here."""
        out = []
        for line in lines:
            if not 0 < len(line.texts) <= self.max_texts:
                raise ValueError(f"line {line.custom_id} has {len(line.texts)} texts")
            body: dict[str, Any] = {
                "model": self.model,
                "input": list(line.texts),
                "encoding_format": "base64",
            }
            if self.send_dimensions:
                body["dimensions"] = self.dimension
            request = {"custom_id": line.custom_id, "method": "POST", "url": ENDPOINT}
            out.append(orjson.dumps({**request, "body": body}))
        return b"\n".join(out) + b"\n"

    async def upload(self, lines: Sequence[Line]) -> str:
        """The input file's id."""
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field(
            "file", self.jsonl(lines), filename="batch.jsonl", content_type="application/jsonl"
        )
        body = await self._call("POST", "/files", data=form)
        return str(body["id"])

    async def create(self, file_id: str, metadata: Mapping[str, str] | None = None) -> str:
        """Start the job on an uploaded file; its id. Not retried: a retry after an answer
        that was lost would start a second job (the caller keeps the file id and decides)."""
        payload: dict[str, Any] = {
            "input_file_id": file_id,
            "endpoint": ENDPOINT,
            "completion_window": WINDOW,
        }
        if metadata:
            payload["metadata"] = dict(metadata)
        body = await self._call("POST", "/batches", payload=payload)
        return str(body["id"])

    async def find(self, file_id: str) -> str | None:
        """The batch already created on ``file_id``, if any: after a crash between the
        creation and the recording of its id, the job is found instead of started again."""
        after: str | None = None
        while True:
            params = {"limit": 100, **({"after": after} if after else {})}
            page = await self._call("GET", "/batches", params=params)
            for batch in page.get("data") or []:
                if batch.get("input_file_id") == file_id:
                    return str(batch["id"])
            if not page.get("has_more") or not page.get("last_id"):
                return None
            after = str(page["last_id"])

    async def status(self, batch_id: str) -> dict[str, Any]:
        body: dict[str, Any] = await self._call("GET", f"/batches/{batch_id}")
        return body

    async def wait(self, batch_id: str) -> dict[str, Any]:
        """Poll until the job has ended, the delay doubling up to ``poll_max_s``; a transient
        error of a poll is only a later poll."""
        attempt = 0
        seen = None
        while True:
            try:
                batch = await self.status(batch_id)
            except TransientError:
                batch = {}
            status = batch.get("status")
            if status is not None and status != seen:
                seen = status
                log.info("batch job", batch=batch_id, status=status, **_counts(batch))
            if status in ENDED:
                return batch
            await asyncio.sleep(backoff.capped(attempt, self.poll_initial_s, self.poll_max_s))
            attempt += 1

    async def outcome(self, batch: Mapping[str, Any], counts: Mapping[str, int]) -> Outcome:
        """Read an ended job's files: vectors by ``custom_id`` (``counts`` says how many texts
        each line sent) and each failed line's error, classified like a real-time answer."""
        status = str(batch.get("status"))
        if status in ("failed", "cancelled"):
            errors = (batch.get("errors") or {}).get("data") or []
            detail = "; ".join(f"line {e.get('line')}: {e.get('message')}" for e in errors[:5])
            raise BatchFailed(f"batch {batch.get('id')} {status}: {detail}".rstrip(": "))
        out = Outcome(status)
        for row in await self._rows(batch.get("output_file_id")):
            custom_id = str(row.get("custom_id"))
            response = row.get("response") or {}
            out.embedded[custom_id] = self._embeddings(response.get("body"), counts[custom_id])
        for row in await self._rows(batch.get("error_file_id")):
            out.failed[str(row.get("custom_id"))] = _line_error(row)
        missing = set(counts) - set(out.embedded) - set(out.failed)
        for custom_id in missing:
            out.failed[custom_id] = TransientError(f"batch {batch.get('id')} left no answer")
        return out

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _embeddings(self, body: Any, count: int) -> Embeddings:
        try:
            pairs = [(int(d["index"]), _decode(d["embedding"])) for d in body["data"]]
            tokens = (body.get("usage") or {}).get("total_tokens")
        except (KeyError, TypeError, ValueError) as exc:
            raise TransientError(f"malformed batch output line: {exc!r}") from exc
        return Embeddings(assemble(self.model, count, self.dimension, pairs), tokens)

    async def _rows(self, file_id: object) -> list[dict[str, Any]]:
        if not file_id:
            return []
        content = await self._send("GET", f"/files/{file_id}/content")
        try:
            return [orjson.loads(x) for x in content.splitlines() if x.strip()]
        except orjson.JSONDecodeError as exc:
            raise TransientError(f"file {file_id} is not JSONL") from exc

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        content = await self._send(method, path, **kwargs)
        try:
            return orjson.loads(content)
        except orjson.JSONDecodeError as exc:
            raise TransientError("the provider sent a body that is not JSON") from exc

    async def _send(
        self,
        method: str,
        path: str,
        *,
        payload: Mapping[str, Any] | None = None,
        data: aiohttp.FormData | bytes | None = None,
        params: Mapping[str, str | int] | None = None,
    ) -> bytes:
        """The body of a 200; any other answer as ``http.classify`` has it, no answer as
        ``httpclient.failure`` has it. Redirects are not followed (as before, with httpx)."""
        headers, body = self._headers, data
        if payload is not None:
            headers = {**headers, "Content-Type": "application/json"}
            body = orjson.dumps(payload)
        if self._session is None:
            self._session = httpclient.session(self._timeout)
        try:
            async with self._session.request(
                method,
                self._base + path,
                params=params,
                data=body,
                headers=headers,
                allow_redirects=False,
                **self._proxy,
            ) as response:
                status, content = response.status, await response.read()
                retry_after = response.headers.get("retry-after")
        except (TimeoutError, aiohttp.ClientError) as exc:
            code, message = httpclient.failure(exc)
            raise TransientError(message, code=code) from exc
        if status != 200:
            raise classify(status, content, retry_after)
        return content


def _counts(batch: Mapping[str, Any]) -> dict[str, int]:
    counts = batch.get("request_counts")
    return (
        {k: v for k, v in counts.items() if isinstance(v, int)} if isinstance(counts, dict) else {}
    )


def _line_error(row: Mapping[str, Any]) -> EmbeddingError:
    """A failed line as the real-time path would have seen its answer."""
    response = row.get("response")
    if isinstance(response, dict) and isinstance(response.get("status_code"), int):
        error = classify(response["status_code"], orjson.dumps(response.get("body")))
        return error if isinstance(error, EmbeddingError) else TransientError(str(error))
    detail = row.get("error") or {}
    code = str(detail.get("code") or "batch_error")
    # An expired line, or one the job could not run: nothing was wrong with its texts.
    return TransientError(f"{code}: {detail.get('message') or ''}".strip(), code=code)
