"""The OpenAI-compatible batch interface, as DashScope serves it beside the embeddings.

A client uploads a JSONL file (``POST /v1/files``, multipart, purpose ``batch``) whose lines
are ``/v1/embeddings`` requests named by ``custom_id``, creates a batch on it (``POST
/v1/batches``), polls ``GET /v1/batches/{id}`` and downloads the output and error files
(``GET /v1/files/{id}/content``). Why in the fake: a backfill through this interface costs
half the real-time price, and its failure modes (a whole file refused at validation, some
lines failed, a job expired before all its lines ran) must be testable without a key.

The job moves when it is looked at: validating until the first look, in progress until
``batch_delay_s`` has passed since creation, finalizing for one look, then completed; its lines are
answered once, at completion, by the same code as ``/v1/embeddings`` (limits, content
inspection), minus the real-time faults and quotas, which a batch does not meet. Faults of
its own: ``batch_line_failure_rate`` (a line fails with a 500 in the error file),
``batch_expire`` (the window runs out with half the lines done; the rest are
``batch_expired`` errors), ``batch_drop_create_answers`` (a batch is created but the answer
is lost: a client that simply retries starts it twice).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fakeapi.config import FakeConfig

ENDPOINT = "/v1/embeddings"
COMPLETION_WINDOWS = ("24h",)
# Both bases DashScope answers on; the batch lines name the endpoint without either.
_PREFIXES = ("/compatible-mode/v1", "/v1")
_FILE = re.compile(r"/files/(?P<id>[^/]+)(?P<content>/content)?")
_BATCH = re.compile(r"/batches/(?P<id>[^/]+)(?P<cancel>/cancel)?")
MAX_FILE_BYTES = 32 * 1024 * 1024

# One line's answer as /v1/embeddings would give it: (status, JSON body, tokens billed).
Answer = Callable[[bytes], tuple[int, Any, int]]


class Refused(Exception):
    """An error answer of the batch API (the app wraps it in the OpenAI error body)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Dropped(Exception):
    """The request was carried out but its answer is lost (the app resets the connection)."""


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


@dataclass
class _Batch:
    id: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, str] | None
    created_at: int
    started: float  # monotonic
    status: str = "validating"
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(
        default_factory=lambda: {"total": 0, "completed": 0, "failed": 0}
    )
    stamps: dict[str, int | None] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "batch",
            "endpoint": ENDPOINT,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.created_at + 86_400,
            "request_counts": dict(self.counts),
            "metadata": self.metadata,
        }
        for stage in (
            "in_progress",
            "finalizing",
            "completed",
            "failed",
            "expired",
            "cancelling",
            "cancelled",
        ):
            body[f"{stage}_at"] = self.stamps.get(stage)
        return body


class BatchService:
    """Files and batches in memory; ``handle`` answers one request of the batch API."""

    def __init__(self, config: Callable[[], FakeConfig], answer: Answer) -> None:
        self._config = config
        self._answer = answer
        self._files: dict[str, _File] = {}
        self._batches: dict[str, _Batch] = {}
        self._lock = threading.Lock()  # tests read the counters from their own thread
        self.created = 0
        self.lines = 0
        self.tokens = 0

    @staticmethod
    def owns(path: str) -> bool:
        return any(
            path.startswith(p + "/files") or path.startswith(p + "/batches") for p in _PREFIXES
        )

    def reset(self) -> None:
        """Zero the counters (the files and batches stay, as they would on the service)."""
        with self._lock:
            self.created = self.lines = self.tokens = 0

    def snapshot(self) -> dict[str, int]:
        """Batches created, lines answered and the tokens they billed (at the batch price)."""
        with self._lock:
            return {"created": self.created, "lines": self.lines, "tokens": self.tokens}

    def handle(self, method: str, path: str, content_type: str, body: bytes) -> tuple[int, Any]:
        """(status, JSON body or the raw bytes of a file); raises Refused."""
        for prefix in _PREFIXES:
            if path.startswith(prefix + "/"):
                path = path[len(prefix) :]
                break
        if path == "/files":
            _allow(method, "POST")
            return 200, self._upload(content_type, body)
        if path == "/batches" and method == "GET":
            return 200, self._list()
        if path == "/batches":
            _allow(method, "POST")
            return 200, self._create(body)
        if match := _FILE.fullmatch(path):
            _allow(method, "GET")
            file = self._file(match["id"])
            return 200, file.content if match["content"] else file.describe()
        if match := _BATCH.fullmatch(path):
            batch = self._batch(match["id"])
            if match["cancel"]:
                _allow(method, "POST")
                return 200, self._cancel(batch)
            _allow(method, "GET")
            self._advance(batch)
            return 200, batch.describe()
        raise Refused(404, "NotFound", f"no route for {path}")

    def _upload(self, content_type: str, body: bytes) -> dict[str, Any]:
        parts = _multipart(content_type, body)
        purpose = parts.get("purpose", (None, b""))[1].decode("utf-8", "replace")
        if purpose != "batch":
            raise Refused(400, "InvalidParameter", "purpose must be 'batch'.")
        if "file" not in parts:
            raise Refused(400, "InvalidParameter", "A 'file' part is required.")
        filename, content = parts["file"]
        if not content.strip():
            raise Refused(400, "InvalidParameter", "The file is empty.")
        if len(content) > MAX_FILE_BYTES:
            raise Refused(400, "InvalidParameter", "The file is larger than 32 MB.")
        file = _File(_id("file"), filename or "batch.jsonl", purpose, content, int(time.time()))
        self._files[file.id] = file
        return file.describe()

    def _create(self, body: bytes) -> dict[str, Any]:
        try:
            data = json.loads(body)
        except ValueError:
            raise Refused(400, "InvalidParameter", "The request body is not valid JSON.") from None
        if not isinstance(data, dict):
            raise Refused(400, "InvalidParameter", "The request body must be a JSON object.")
        if data.get("endpoint") != ENDPOINT:
            raise Refused(400, "InvalidParameter", f"endpoint must be {ENDPOINT!r}.")
        if data.get("completion_window") not in COMPLETION_WINDOWS:
            raise Refused(400, "InvalidParameter", "completion_window must be '24h'.")
        file = self._file(data.get("input_file_id"))
        if file.purpose != "batch":
            raise Refused(400, "InvalidParameter", "The input file's purpose is not 'batch'.")
        metadata = data.get("metadata")
        batch = _Batch(
            _id("batch"),
            file.id,
            data["completion_window"],
            metadata if isinstance(metadata, dict) else None,
            int(time.time()),
            time.monotonic(),
        )
        self._batches[batch.id] = batch
        with self._lock:
            self.created += 1
        cfg = self._config()
        if cfg.batch_drop_create_answers > 0:
            cfg.batch_drop_create_answers -= 1
            raise Dropped
        return batch.describe()

    def _list(self) -> dict[str, Any]:
        """Every batch, newest first, on one page (the service pages with ``after``); a job
        moves only when looked at by its id, so a listing never runs another test's job."""
        data = [b.describe() for b in list(self._batches.values())[::-1]]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": False,
        }

    def _cancel(self, batch: _Batch) -> dict[str, Any]:
        self._advance(batch)
        if batch.status in ("validating", "in_progress"):
            batch.status = "cancelled"
            batch.stamps["cancelling"] = batch.stamps["cancelled"] = int(time.time())
        return batch.describe()

    def _file(self, file_id: object) -> _File:
        file = self._files.get(file_id) if isinstance(file_id, str) else None
        if file is None:
            raise Refused(404, "NotFound", f"No such file: {file_id!r}.")
        return file

    def _batch(self, batch_id: str) -> _Batch:
        batch = self._batches.get(batch_id)
        if batch is None:
            raise Refused(404, "NotFound", f"No such batch: {batch_id!r}.")
        return batch

    def _advance(self, batch: _Batch) -> None:
        """Move the job along by the time since its creation; run its lines at the end."""
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return
        cfg = self._config()
        now = int(time.time())
        if batch.status == "validating":
            lines, errors = _validate(self._files[batch.input_file_id].content, cfg)
            if errors:
                batch.status, batch.errors = "failed", errors
                batch.stamps["failed"] = now
                return
            batch.counts["total"] = len(lines)
            batch.status = "in_progress"
            batch.stamps["in_progress"] = now
        if batch.status == "in_progress":
            if time.monotonic() - batch.started < cfg.batch_delay_s:
                return
            batch.status = "finalizing"  # one look in this state: clients must expect it
            batch.stamps["finalizing"] = now
            return
        self._run(batch, cfg)

    def _run(self, batch: _Batch, cfg: FakeConfig) -> None:
        lines, _ = _validate(self._files[batch.input_file_id].content, cfg)
        # Seeded by the file's content: the same job fails the same lines, run after run.
        content = self._files[batch.input_file_id].content
        rng = random.Random(f"{cfg.seed}:{hashlib.sha256(content).hexdigest()}")
        done = len(lines) // 2 if cfg.batch_expire else len(lines)
        outputs: list[bytes] = []
        failures: list[bytes] = []
        tokens = 0
        for n, line in enumerate(lines):
            result: dict[str, Any] = {"id": _id("batch_req"), "custom_id": line["custom_id"]}
            if n >= done:
                result["response"] = None
                result["error"] = {
                    "code": "batch_expired",
                    "message": "This line could not be executed before the batch expired.",
                }
                failures.append(_jsonl(result))
                continue
            if rng.random() < cfg.batch_line_failure_rate:
                status, body, billed = 500, _server_error(), 0
            else:
                status, body, billed = self._answer(json.dumps(line["body"]).encode())
            result["response"] = {"status_code": status, "request_id": _id("req"), "body": body}
            result["error"] = None
            (outputs if status == 200 else failures).append(_jsonl(result))
            tokens += billed
        now = int(time.time())
        batch.counts["completed"] = len(outputs)
        batch.counts["failed"] = len(failures)
        if outputs:
            batch.output_file_id = self._store(b"".join(outputs), "batch_output")
        if failures:
            batch.error_file_id = self._store(b"".join(failures), "batch_error")
        batch.status = "expired" if cfg.batch_expire else "completed"
        batch.stamps[batch.status] = now
        with self._lock:
            self.lines += done
            self.tokens += tokens

    def _store(self, content: bytes, purpose: str) -> str:
        file = _File(_id("file"), f"{purpose}.jsonl", purpose, content, int(time.time()))
        self._files[file.id] = file
        return file.id


def _validate(content: bytes, cfg: FakeConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The file's lines, or the errors that fail the whole batch (OpenAI's ``errors.data``).

    What fails the file is its form (JSON, ``custom_id`` unique, method, url, a body, one
    model); what a line asks of the model (its texts, their limits) is that line's answer.
    """
    lines: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    models: set[str] = set()

    def bad(number: int, code: str, message: str) -> None:
        errors.append({"code": code, "message": message, "line": number, "param": None})

    raw = content.decode("utf-8", "replace").splitlines()
    for number, text in enumerate(raw, start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except ValueError:
            bad(number, "invalid_json_line", "This line is not valid JSON.")
            continue
        if not isinstance(line, dict):
            bad(number, "invalid_json_line", "This line is not a JSON object.")
            continue
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            bad(number, "missing_required_parameter", "custom_id is required.")
        elif custom_id in seen:
            bad(number, "duplicate_custom_id", f"custom_id {custom_id!r} is not unique.")
        else:
            seen.add(custom_id)
        if line.get("method") != "POST":
            bad(number, "invalid_method", "method must be 'POST'.")
        if line.get("url") != ENDPOINT:
            bad(number, "invalid_url", f"url must be {ENDPOINT!r}, the batch's endpoint.")
        body = line.get("body")
        if not isinstance(body, dict):
            bad(number, "missing_required_parameter", "body must be a JSON object.")
        elif isinstance(body.get("model"), str):
            models.add(body["model"])
        lines.append(line)
    if len(models) > 1:
        bad(0, "mismatched_model", "All lines of a batch must use the same model.")
    if len(lines) > cfg.batch_max_lines:
        bad(0, "too_many_lines", f"A batch file holds at most {cfg.batch_max_lines} lines.")
    if not lines and not errors:
        bad(0, "empty_file", "The file holds no requests.")
    return lines, errors


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The named parts of a ``multipart/form-data`` body: name -> (filename, content)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.startswith("multipart/form-data") or match is None:
        raise Refused(400, "InvalidParameter", "Expected a multipart/form-data body.")
    delimiter = b"--" + match[1].encode()
    parts: dict[str, tuple[str | None, bytes]] = {}
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise Refused(400, "InvalidParameter", "A multipart part has no header end.")
        disposition = head.decode("utf-8", "replace")
        name = re.search(r'\bname="([^"]*)"', disposition)
        filename = re.search(r'\bfilename="([^"]*)"', disposition)
        if name is None:
            raise Refused(400, "InvalidParameter", "A multipart part has no name.")
        parts[name[1]] = (filename[1] if filename else None, content.removesuffix(b"\r\n"))
    return parts


def _allow(method: str, expected: str) -> None:
    if method != expected:
        raise Refused(405, "MethodNotAllowed", f"{method} not allowed")


def _server_error() -> dict[str, Any]:
    return {
        "error": {
            "code": "InternalError",
            "message": "An internal error has occured, please retry.",
            "type": "server_error",
        }
    }


def _jsonl(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _id(kind: str) -> str:
    return f"{kind}_{uuid.uuid4().hex}"
