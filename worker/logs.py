"""structlog configured once: JSON for machines, readable lines in a terminal.

Secrets never reach a log line: settings hold them as SecretStr, and a processor masks
anything that looks like a key or a password in a DSN in case one slips into a message.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_SECRET_PATTERNS = (
    (re.compile(r"(://[^:/@\s]+:)[^@\s]+@"), r"\1***@"),  # password in a URI
    (re.compile(r"\bsk-[A-Za-z0-9_-]{6,}"), "sk-***"),  # DashScope / OpenAI style keys
    (re.compile(r"(?i)(bearer\s+)[^\s'\"]+"), r"\1***"),
)


def redact(value: str) -> str:
    for pattern, repl in _SECRET_PATTERNS:
        value = pattern.sub(repl, value)
    return value


def _redact_processor(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact(value)
    return event


def configure(level: str = "info", fmt: str = "auto", file: TextIO | None = None) -> None:
    out = file or sys.stderr
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
