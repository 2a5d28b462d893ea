"""structlog configured once: JSON for machines, readable lines in a terminal.

Everything goes through one handler on the root logger, rendered by structlog's
``ProcessorFormatter``: the worker's own structlog events and the standard-library records of
asyncpg, aiokafka, asyncio or any other library come out as the same lines (level, logger,
timestamp, exception as a field), so a JSON log never holds a plain-text line.

Secrets never reach a log line: settings hold them as SecretStr, and the last processor before
the renderer masks anything that looks like a key, a bearer token or a password in a URI,
in every field at any depth (keys included), in exception messages and tracebacks, and in
the formatted message of a library's record, in case one slips in.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog
from structlog.types import Processor

_SECRET_PATTERNS = (
    (re.compile(r"(://[^:/@\s]+:)[^@\s]+@"), r"\1***@"),  # password in a URI
    (re.compile(r"\bsk-[A-Za-z0-9_-]{6,}"), "sk-***"),  # DashScope / OpenAI style keys
    (re.compile(r"(?i)(bearer\s+)[^\s'\"]+"), r"\1***"),
)
# Deeper than any real log field; a self-referencing structure stops here, rendered as text.
_MAX_DEPTH = 32
# Our own loggers (structlog's are named after the module: worker.pipeline.runner, ...).
_OWN_LOGGERS = ("worker", "fakeapi", "benchmarks")


def redact(value: str) -> str:
    for pattern, repl in _SECRET_PATTERNS:
        value = pattern.sub(repl, value)
    return value


def scrub(value: Any, depth: int = 0) -> Any:
    """`value` with every string in it redacted: mappings (keys too), sequences and sets at
    any depth; other objects (exceptions, paths, ...) as their redacted text, since that is
    what a renderer would print of them."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact(value)
    if depth >= _MAX_DEPTH:
        return redact(str(value))
    if isinstance(value, Mapping):
        return {
            (redact(k) if isinstance(k, str) else scrub(k, depth + 1)): scrub(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [scrub(v, depth + 1) for v in value]
    if isinstance(value, bytes):
        return redact(value.decode("utf-8", "replace"))
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    return redact(str(value))


def _redact_processor(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    return scrub(event)  # type: ignore[no-any-return]


def stdlib_level(level: str) -> int:
    """The level of other libraries' loggers: WARNING (aiokafka and asyncpg chatter at INFO),
    or the worker's own level when that is higher or debug."""
    own = logging.getLevelNamesMapping()[level.upper()]
    return own if own == logging.DEBUG else max(own, logging.WARNING)


_handler: logging.Handler | None = None


def configure(level: str = "info", fmt: str = "auto", file: TextIO | None = None) -> None:
    """Render structlog's events and every standard-library record to `file` (stderr)."""
    global _handler
    out = file or sys.stderr
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: Processor = (
        structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    own = logging.getLevelNamesMapping()[level.upper()]
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(own),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            # After the exception is rendered to text, so that its message is redacted too.
            _redact_processor,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    root.setLevel(stdlib_level(level))
    for name in _OWN_LOGGERS:
        logging.getLogger(name).setLevel(own)
    # Python warnings (deprecations...) as records of the "py.warnings" logger, not raw text.
    logging.captureWarnings(True)
