"""Knobs of the fake: limits, latency, and the faults it injects.

One mutable object shared with the running server: a test changes a field (directly, or with
``POST /_fake/config``) and the next request sees it. Fault rates are probabilities per API
request drawn from one seeded RNG, so a failing run replays exactly (for a fixed request order).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

NATIVE_DIMENSIONS: tuple[int, ...] = (2048, 1536, 1024, 768, 512, 256, 128, 64)

# Fault rates, in the order one uniform draw is matched against their cumulative sum.
FAULT_RATES = (
    "rate_reset",
    "rate_timeout",
    "rate_500",
    "rate_429",
    "rate_429_no_retry_after",
)


@dataclass
class FakeConfig:
    """Everything a test can change on a running fake; defaults are text-embedding-v4's."""

    # None disables the check; otherwise ``Authorization: Bearer <api_key>`` is required.
    api_key: str | None = "test-key"
    max_texts: int = 10
    max_tokens: int = 8192
    # The native dialect accepts only these; the OpenAI dialect accepts any positive value.
    allowed_dimensions: tuple[int, ...] = NATIVE_DIMENSIONS
    default_dimension: int = 1024
    # Added to every request that reaches the model (not to 401/429/400 answers).
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    # Return results in a random order, to prove that clients place them by index.
    shuffle: bool = False
    seed: int = 0
    # Probabilities per request. Their sum should stay <= 1 (they share one draw).
    rate_429: float = 0.0
    rate_429_no_retry_after: float = 0.0
    retry_after_s: float = 1.0
    rate_500: float = 0.0
    rate_timeout: float = 0.0
    timeout_sleep_s: float = 30.0
    rate_reset: float = 0.0
    # Any text containing one of these substrings fails the request: 400 DataInspectionFailed.
    poison: list[str] = field(default_factory=list)
    # Answer every API request 401 InvalidApiKey (a revoked key), whatever the header says.
    auth_fault: bool = False
    # Per-minute quotas, enforced per second (quota / 60) with one second's worth of burst.
    rpm: int | None = None
    tpm: int | None = None
    # The batch interface (fakeapi/batches.py): seconds from creation to completion, the share
    # of lines that fail with a 500 in the error file, jobs that expire with half their lines
    # done, the most lines one input file may hold, and how many of the next batch creations
    # succeed but lose their answer (the connection is reset: did it happen or not?).
    batch_delay_s: float = 0.0
    batch_line_failure_rate: float = 0.0
    batch_expire: bool = False
    batch_max_lines: int = 50_000
    batch_drop_create_answers: int = 0

    def validate(self) -> None:
        """Raise ValueError on a value the fake cannot honour."""
        for name in FAULT_RATES:
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {rate}")
        if not 0.0 <= self.batch_line_failure_rate <= 1.0:
            raise ValueError("batch_line_failure_rate must be within [0, 1]")
        for name in (
            "latency_ms",
            "latency_jitter_ms",
            "retry_after_s",
            "timeout_sleep_s",
            "batch_delay_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("max_texts", "max_tokens", "default_dimension", "batch_max_lines"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.batch_drop_create_answers < 0:
            raise ValueError("batch_drop_create_answers must be >= 0")
        for name in ("rpm", "tpm"):
            quota = getattr(self, name)
            if quota is not None and quota <= 0:
                raise ValueError(f"{name} must be > 0 or null")
        if not self.allowed_dimensions or any(d <= 0 for d in self.allowed_dimensions):
            raise ValueError("allowed_dimensions must be a non-empty list of positive ints")

    def update(self, values: Mapping[str, Any]) -> None:
        """Apply a JSON-like mapping of fields, all or nothing; ValueError names the bad field."""
        hints = typing.get_type_hints(FakeConfig)
        names = {f.name for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for name, value in values.items():
            if name not in names:
                raise ValueError(f"unknown config field {name!r}")
            changes[name] = _coerce(name, hints[name], value)
        candidate = dataclasses.replace(self, **changes)
        candidate.validate()
        for name, value in changes.items():
            setattr(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (what ``GET /_fake/config`` returns)."""
        data = dataclasses.asdict(self)
        data["allowed_dimensions"] = list(self.allowed_dimensions)
        return data


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against the field's annotation, converting JSON forms (list -> tuple)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = (a for a in args if a is not type(None))
        return _coerce(name, inner, value)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple) and isinstance(value, list | tuple):
        item = args[0]
        items = [_coerce(name, item, v) for v in value]
        return tuple(items) if origin is tuple else items
    raise ValueError(f"config field {name!r} expects {hint}, got {value!r}")
