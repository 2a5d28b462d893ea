"""The fake DashScope embedding service: request handling plus a small h11 HTTP/1.1 server.

Why not uvicorn: an ASGI app cannot drop its TCP connection without a response, and a connection
reset is one of the faults the worker must survive. Owning the socket makes that a real RST, and
h11 + asyncio streams keep the per-request overhead low with keep-alive for pooled clients.

Order of checks for an API request (the order a real gateway would use):
auth (401) -> injected fault draw (reset / timeout / 500 / 429) -> RPM quota (429) -> body
(400) -> batch, empty and length limits (400) -> TPM quota (429) -> content inspection (400)
-> model latency -> injected 500 -> embeddings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import socket
import struct
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import h11

from fakeapi import multimodal
from fakeapi.batches import BatchService, Dropped, Refused
from fakeapi.config import FAULT_RATES, FakeConfig
from fakeapi.stats import FakeStats
from fakeapi.tokens import count_tokens
from fakeapi.vectors import fake_vector, fake_vector_b64
from fakeapi.vocabulary import sparse_vector

NATIVE_PATH = "/api/v1/services/embeddings/text-embedding/text-embedding"
OPENAI_PATHS = ("/compatible-mode/v1/embeddings", "/v1/embeddings")
_ROUTES = {
    NATIVE_PATH: "native",
    multimodal.PATH: "multimodal",
    **dict.fromkeys(OPENAI_PATHS, "openai"),
}

MAX_BODY_BYTES = 32 * 1024 * 1024
# The OpenAI dialect takes "any positive" dimension; this cap only keeps a typo from eating RAM.
MAX_OPENAI_DIMENSION = 65_536
# DashScope's own wording, misspelling included.
INTERNAL_ERROR = "An internal error has occured, please retry."
_TEXT_TYPES = ("document", "query")
_OUTPUT_TYPES = {"dense": (True, False), "sparse": (False, True), "dense&sparse": (True, True)}
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    429: "rate_limit_error",
}


@dataclass(slots=True)
class Reply:
    """An HTTP answer; ``code`` is the error code (for stats), None on success."""

    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    code: str | None = None


class ResetConnection(Exception):
    """Raised by the handler to make the transport drop the connection with no response."""


class ApiError(Exception):
    """An error answer in the provider's shape, raised from deep inside request handling."""

    def __init__(
        self, status: int, code: str, message: str, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = list(headers)


@dataclass(slots=True)
class _Job:
    """A parsed, dialect-independent embedding request."""

    dialect: str
    model: str
    texts: list[str]
    dimension: int
    dense: bool = True
    sparse: bool = False
    base64: bool = False


class TokenBucket:
    """A per-minute quota enforced per second: refills quota/60 per second, holds one second."""

    def __init__(self, per_minute: int) -> None:
        self.quota = per_minute
        self.rate = per_minute / 60.0
        # At least one unit, or a quota under 60/min could never admit anything.
        self.capacity = max(self.rate, 1.0)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def take(self, cost: float) -> float:
        """Take ``cost`` and return 0.0, or return the seconds until it could be taken.

        A cost above the capacity is admitted from a full bucket and leaves it in debt, so one
        huge request is possible but the average rate still holds.
        """
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        need = min(cost, self.capacity)
        if self.level >= need:
            self.level -= cost
            return 0.0
        return (need - self.level) / self.rate


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _seconds(value: float) -> bytes:
    """Retry-After value: whole seconds when whole, else fractional (fast tests want 0.05 s)."""
    if value == int(value):
        return str(int(value)).encode()
    return f"{math.ceil(value * 1000) / 1000:g}".encode()


def _bad(message: str) -> ApiError:
    return ApiError(400, "InvalidParameter", message)


class FakeApp:
    """The service's behaviour: routing, validation, faults, quotas, embeddings, stats."""

    def __init__(self, config: FakeConfig | None = None) -> None:
        self.config = config if config is not None else FakeConfig()
        self.stats = FakeStats()
        self._seed = self.config.seed
        self._rng = random.Random(self._seed)
        self._rpm: TokenBucket | None = None
        self._tpm: TokenBucket | None = None
        self.batches = BatchService(lambda: self.config, self.answer_offline)
        # The parts of every multimodal request answered or refused, in order (tests check
        # that an event the worker refuses was never sent).
        self.multimodal_requests: list[list[tuple[str, str]]] = []

    async def handle(
        self, method: str, target: str, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> Reply:
        """Answer one request; raises ResetConnection when the connection must be dropped."""
        path = target.split("?", 1)[0]
        if path.startswith("/_fake/"):
            return self._control(method, path, body)
        if BatchService.owns(path):
            return self._batch_api(method, path, headers, body)
        dialect = _ROUTES.get(path)
        if dialect is None:
            return _error(404, "NotFound", f"no route for {path}", "native")
        if method != "POST":
            return _error(405, "MethodNotAllowed", f"{method} not allowed", dialect)
        self.stats.request_started(dialect)
        status: int | None = None
        code: str | None = None
        try:
            reply = await self._api(dialect, headers, body)
            status, code = reply.status, reply.code
            return reply
        except ResetConnection:
            self.stats.connection_reset()
            raise
        finally:
            self.stats.request_finished(status, code)

    async def _api(
        self, dialect: str, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> Reply:
        cfg = self.config
        try:
            self._check_auth(cfg, headers)
            fault = self._draw_fault(cfg)
            if fault == "rate_reset":
                raise ResetConnection
            if fault == "rate_timeout":
                # Hold the request far longer than any sane client timeout, then answer anyway.
                self.stats.timeout_injected()
                await asyncio.sleep(cfg.timeout_sleep_s)
            elif fault == "rate_429":
                raise ApiError(
                    429,
                    "Throttling",
                    "Requests rate limit exceeded, please try again later.",
                    [(b"retry-after", _seconds(cfg.retry_after_s))],
                )
            elif fault == "rate_429_no_retry_after":
                raise ApiError(
                    429, "Throttling", "Requests rate limit exceeded, please try again later."
                )
            self._rpm = _bucket(self._rpm, cfg.rpm)
            if self._rpm is not None:
                _check_quota(self._rpm, 1, "Requests rate limit exceeded")
            if dialect == "multimodal":  # the same latency and 500s, its own answer
                await self._latency(cfg)
                if fault == "rate_500":
                    raise ApiError(500, "InternalError", INTERNAL_ERROR)
                return self._multimodal(cfg, body)
            job = self._parse(dialect, cfg, body)
            total_tokens = self._validate(cfg, job)
            self._tpm = _bucket(self._tpm, cfg.tpm)
            if self._tpm is not None:
                _check_quota(self._tpm, total_tokens, "Tokens rate limit exceeded")
            _inspect(cfg, job)
            await self._latency(cfg)
            if fault == "rate_500":
                raise ApiError(500, "InternalError", INTERNAL_ERROR)
            reply = self._embed(cfg, job, total_tokens)
        except ApiError as exc:
            return _error(exc.status, exc.code, exc.message, dialect, exc.headers)
        self.stats.embedded(len(job.texts), total_tokens)
        return reply

    async def _latency(self, cfg: FakeConfig) -> None:
        delay_ms = cfg.latency_ms
        if cfg.latency_jitter_ms:
            delay_ms += self._rng.uniform(0.0, cfg.latency_jitter_ms)
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000.0)

    def _batch_api(
        self, method: str, path: str, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> Reply:
        """Files and batches (fakeapi/batches.py), behind the same key as the embeddings."""
        content_type = next((v for k, v in headers if k == b"content-type"), b"")
        try:
            self._check_auth(self.config, headers)
            status, answer = self.batches.handle(method, path, content_type.decode("latin-1"), body)
        except ApiError as exc:
            return _error(exc.status, exc.code, exc.message, "openai")
        except Refused as exc:
            return _error(exc.status, exc.code, exc.message, "openai")
        except Dropped:
            raise ResetConnection from None
        return Reply(status, answer if isinstance(answer, bytes) else _json(answer))

    def answer_offline(self, body: bytes) -> tuple[int, Any, int]:
        """One line of a batch: what ``/v1/embeddings`` answers (status, body, tokens billed),
        without the real-time faults, quotas and latency, which an offline job does not meet."""
        cfg = self.config
        try:
            job = self._parse("openai", cfg, body)
            tokens = self._validate(cfg, job)
            _inspect(cfg, job)
        except ApiError as exc:
            return (
                exc.status,
                json.loads(_error(exc.status, exc.code, exc.message, "openai").body),
                0,
            )
        return 200, json.loads(self._embed(cfg, job, tokens).body), tokens

    def _check_auth(self, cfg: FakeConfig, headers: Sequence[tuple[bytes, bytes]]) -> None:
        if cfg.auth_fault:
            raise ApiError(401, "InvalidApiKey", "Invalid API-key provided.")
        if cfg.api_key is None:
            return
        auth = next((v for k, v in headers if k == b"authorization"), None)
        if auth is None:
            raise ApiError(401, "InvalidApiKey", "No API-key provided.")
        scheme, _, key = auth.partition(b" ")
        if scheme.lower() != b"bearer" or key.strip() != cfg.api_key.encode():
            raise ApiError(401, "InvalidApiKey", "Invalid API-key provided.")

    def _draw_fault(self, cfg: FakeConfig) -> str | None:
        """One uniform draw against the cumulative fault rates (None: behave)."""
        if cfg.seed != self._seed:
            self.reseed(cfg.seed)
        rates = [(name, getattr(cfg, name)) for name in FAULT_RATES]
        if not any(rate for _, rate in rates):
            return None
        draw = self._rng.random()
        for name, rate in rates:
            if draw < rate:
                return name
            draw -= rate
        return None

    def reseed(self, seed: int) -> None:
        """Restart the fault/shuffle/jitter sequence (done on any ``seed`` change)."""
        self._seed = seed
        self._rng.seed(seed)

    def _parse(self, dialect: str, cfg: FakeConfig, body: bytes) -> _Job:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise _bad("The request body is not valid JSON.") from None
        if not isinstance(data, dict):
            raise _bad("The request body must be a JSON object.")
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise _bad("Model not specified: 'model' must be a non-empty string.")
        if dialect == "native":
            return _parse_native(cfg, model, data)
        return _parse_openai(cfg, model, data)

    def _validate(self, cfg: FakeConfig, job: _Job) -> int:
        """Enforce the per-request limits and return the request's token count."""
        self.stats.batch_seen(len(job.texts))
        if len(job.texts) > cfg.max_texts:
            raise _bad(f"batch size is invalid, it should not be larger than {cfg.max_texts}.")
        total = 0
        for text in job.texts:
            if not text:
                raise _bad("Empty input is not allowed.")
            try:
                text.encode()
            except UnicodeEncodeError:
                raise _bad("Input is not valid UTF-8.") from None
            tokens = count_tokens(text)
            if tokens > cfg.max_tokens:
                raise _bad(f"Range of input length should be [1, {cfg.max_tokens}]")
            total += tokens
        return total

    def _embed(self, cfg: FakeConfig, job: _Job, total_tokens: int) -> Reply:
        order = list(range(len(job.texts)))
        if cfg.shuffle:
            self._rng.shuffle(order)
        request_id = str(uuid.uuid4())
        texts, dim = job.texts, job.dimension
        if job.dialect == "native":
            items: list[dict[str, Any]] = []
            for i in order:
                item: dict[str, Any] = {"text_index": i}
                if job.dense:
                    item["embedding"] = fake_vector(texts[i], dim).tolist()
                if job.sparse:
                    item["sparse_embedding"] = sparse_vector(texts[i])
                items.append(item)
            payload: dict[str, Any] = {
                "output": {"embeddings": items},
                "usage": {"total_tokens": total_tokens},
                "request_id": request_id,
            }
        elif job.base64:
            # The benchmark path: base64 needs no JSON escaping, so splice it in directly
            # (json.dumps would spend ~0.2 ms per request scanning 55 KB of it).
            data = ",".join(
                '{"object":"embedding","index":'
                + str(i)
                + ',"embedding":"'
                + fake_vector_b64(texts[i], dim)
                + '"}'
                for i in order
            )
            tail = {
                "model": job.model,
                "usage": {"prompt_tokens": total_tokens, "total_tokens": total_tokens},
                "id": request_id,
            }
            return Reply(200, b'{"object":"list","data":[%s],%s' % (data.encode(), _json(tail)[1:]))
        else:
            payload = {
                "object": "list",
                "data": [
                    {
                        "object": "embedding",
                        "index": i,
                        "embedding": fake_vector(texts[i], dim).tolist(),
                    }
                    for i in order
                ],
                "model": job.model,
                "usage": {"prompt_tokens": total_tokens, "total_tokens": total_tokens},
                "id": request_id,
            }
        return Reply(200, _json(payload))

    def _multimodal(self, cfg: FakeConfig, body: bytes) -> Reply:
        """DashScope's multimodal endpoint (fakeapi/multimodal.py), one vector per part."""
        try:
            data = json.loads(body)
            if not isinstance(data, dict):
                raise multimodal.Invalid("The request body must be a JSON object.")
            model, parts = multimodal.parse(data)
            self.multimodal_requests.append(parts)
            tokens = sum(multimodal.check(model, kind, value) for kind, value in parts)
        except ValueError:
            return _error(400, "InvalidParameter", "The request body is not valid JSON.", "native")
        except multimodal.Invalid as exc:
            return _error(400, "InvalidParameter", str(exc), "native")
        if cfg.poison and any(p in v for _, v in parts for p in cfg.poison):
            return _error(
                400,
                "DataInspectionFailed",
                "Input data may contain inappropriate content.",
                "native",
            )
        order = list(range(len(parts)))
        if cfg.shuffle:
            self._rng.shuffle(order)
        items = [
            {
                "index": i,
                "type": parts[i][0],
                "embedding": multimodal.vector(*parts[i], model.dimension).tolist(),
            }
            for i in order
        ]
        images = sum(1 for kind, _ in parts if kind == "image")
        self.stats.embedded(len(parts), tokens)
        payload = {
            "output": {"embeddings": items},
            "usage": {"input_tokens": tokens, "image_count": images},
            "request_id": str(uuid.uuid4()),
        }
        return Reply(200, _json(payload))

    def _control(self, method: str, path: str, body: bytes) -> Reply:
        """The test-only control plane; never counted in the stats."""
        if path == "/_fake/stats" and method == "GET":
            return Reply(200, _json(self.stats.snapshot()))
        if path == "/_fake/reset" and method == "POST":
            self.stats.reset()
            return Reply(200, _json({"ok": True}))
        if path == "/_fake/health" and method == "GET":
            return Reply(200, _json({"ok": True}))
        if path == "/_fake/config" and method == "GET":
            return Reply(200, _json(self.config.to_dict()))
        if path == "/_fake/config" and method == "POST":
            try:
                values = json.loads(body or b"{}")
                if not isinstance(values, dict):
                    raise ValueError("expected a JSON object of FakeConfig fields")
                self.config.update(values)
            except ValueError as exc:
                return _error(400, "InvalidParameter", str(exc), "native")
            if "seed" in values:
                self.reseed(self.config.seed)
            return Reply(200, _json(self.config.to_dict()))
        return _error(404, "NotFound", f"no control route {method} {path}", "native")


def _parse_native(cfg: FakeConfig, model: str, data: dict[str, Any]) -> _Job:
    inp = data.get("input")
    texts = inp.get("texts") if isinstance(inp, dict) else None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise _bad("input.texts must be an array of strings.")
    if not texts:
        raise _bad("input.texts must not be empty.")
    params = data.get("parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise _bad("parameters must be an object.")
    dimension = params.get("dimension", cfg.default_dimension)
    if type(dimension) is not int or dimension not in cfg.allowed_dimensions:
        allowed = ", ".join(str(d) for d in cfg.allowed_dimensions)
        raise _bad(f"Value error, parameters.dimension must be one of [{allowed}].")
    text_type = params.get("text_type", "document")
    if text_type not in _TEXT_TYPES:
        raise _bad("parameters.text_type must be 'document' or 'query'.")
    output_type = params.get("output_type", "dense")
    if not isinstance(output_type, str) or output_type not in _OUTPUT_TYPES:
        raise _bad("parameters.output_type must be 'dense', 'sparse' or 'dense&sparse'.")
    if not isinstance(params.get("instruct", ""), str):
        raise _bad("parameters.instruct must be a string.")
    dense, sparse = _OUTPUT_TYPES[output_type]
    return _Job("native", model, texts, dimension, dense=dense, sparse=sparse)


def _parse_openai(cfg: FakeConfig, model: str, data: dict[str, Any]) -> _Job:
    inp = data.get("input")
    texts = [inp] if isinstance(inp, str) else inp
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise _bad("input must be a string or an array of strings.")
    if not texts:
        raise _bad("input must not be empty.")
    dimension = data.get("dimensions")
    if dimension is None:
        dimension = cfg.default_dimension
    if type(dimension) is not int or not 0 < dimension <= MAX_OPENAI_DIMENSION:
        raise _bad("dimensions must be a positive integer.")
    encoding = data.get("encoding_format")
    if encoding is None:
        encoding = "float"
    if encoding not in ("float", "base64"):
        raise _bad("encoding_format must be 'float' or 'base64'.")
    return _Job("openai", model, texts, dimension, base64=encoding == "base64")


def _inspect(cfg: FakeConfig, job: _Job) -> None:
    """The provider's content inspection: a poison substring refuses the whole request."""
    if cfg.poison and any(p in t for t in job.texts for p in cfg.poison):
        raise ApiError(400, "DataInspectionFailed", "Input data may contain inappropriate content.")


def _bucket(bucket: TokenBucket | None, quota: int | None) -> TokenBucket | None:
    """The bucket for the current quota: kept while the quota is unchanged, rebuilt otherwise."""
    if quota is None:
        return None
    if bucket is not None and bucket.quota == quota:
        return bucket
    return TokenBucket(quota)


def _check_quota(bucket: TokenBucket, cost: float, what: str) -> None:
    wait = bucket.take(cost)
    if wait > 0:
        raise ApiError(
            429,
            "Throttling.RateQuota",
            f"{what}, please try again later.",
            [(b"retry-after", _seconds(wait))],
        )


def _error(
    status: int,
    code: str,
    message: str,
    dialect: str,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> Reply:
    """The provider's error body; the OpenAI dialect also nests it the way OpenAI SDKs read it."""
    request_id = str(uuid.uuid4())
    body: dict[str, Any] = {"code": code, "message": message, "request_id": request_id}
    if dialect == "openai":
        body["error"] = {
            "code": code,
            "message": message,
            "type": _OPENAI_ERROR_TYPES.get(
                status, "invalid_request_error" if status < 500 else "server_error"
            ),
        }
    return Reply(status, _json(body), list(headers), code)


class HttpServer:
    """Serves a FakeApp over HTTP/1.1 with keep-alive on an asyncio loop."""

    def __init__(self, app: FakeApp) -> None:
        self.app = app
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen (port 0 picks a free one) and return the bound port."""
        self._server = await asyncio.start_server(
            self._connection, host, port, backlog=1024, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        """Stop listening and cancel every open connection (including sleeping timeouts)."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self.app.stats.connection_opened()
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await _read_request(conn, reader)
                if request is None:
                    return
                if isinstance(request, Reply):  # body too large
                    await _send(conn, writer, request)
                    return
                event, body = request
                try:
                    reply = await self.app.handle(
                        event.method.decode("ascii", "replace"),
                        event.target.decode("ascii", "replace"),
                        event.headers,
                        body,
                    )
                except ResetConnection:
                    _abort(writer)
                    return
                await _send(conn, writer, reply)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return  # "Connection: close" or an HTTP/1.0 client
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                reply = _error(exc.error_status_hint, "InvalidParameter", str(exc), "native")
                with contextlib.suppress(h11.LocalProtocolError, OSError):
                    await _send(conn, writer, reply)
        except OSError:
            pass  # the client went away (ConnectionResetError, BrokenPipeError, ...)
        except asyncio.CancelledError:
            # Shutdown. This task is the connection's top level: re-raising would only make
            # asyncio's stream callback log a spurious traceback.
            return
        finally:
            if task is not None:
                self._tasks.discard(task)
            if not writer.is_closing():
                writer.close()


async def _read_request(
    conn: h11.Connection, reader: asyncio.StreamReader
) -> tuple[h11.Request, bytes] | Reply | None:
    """The next request and its body; None when the client closed an idle connection."""
    request: h11.Request | None = None
    chunks: list[bytes] = []
    size = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > MAX_BODY_BYTES:
                return _error(413, "InvalidParameter", "Request body too large.", "native")
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, b"".join(chunks)
        else:  # ConnectionClosed (or PAUSED, which cannot happen at the start of a cycle)
            return None


async def _send(conn: h11.Connection, writer: asyncio.StreamWriter, reply: Reply) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(reply.body)).encode()),
        *reply.headers,
    ]
    reason = _REASONS.get(reply.status, b"")
    out = conn.send(h11.Response(status_code=reply.status, headers=headers, reason=reason)) or b""
    out += conn.send(h11.Data(data=reply.body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    writer.write(out)
    await writer.drain()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Drop the connection with a TCP RST (SO_LINGER 0), the way a crashing proxy would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
