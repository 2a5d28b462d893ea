"""Counters the fake keeps so tests can assert on what the client actually sent.

Updated on the server's event loop and read from the test's thread, hence the lock (uncontended,
so it costs next to nothing per request).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any


class FakeStats:
    """What reached the fake, how it answered, and the batch shapes it saw."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0
        self._reset()

    def _reset(self) -> None:
        self.requests = 0
        self.by_status: Counter[int] = Counter()
        self.by_code: Counter[str] = Counter()
        self.by_dialect: Counter[str] = Counter()
        self.texts = 0
        self.tokens = 0
        self.max_batch = 0
        self.batch_sizes: Counter[int] = Counter()
        self.throttled = 0
        self.resets = 0
        self.timeouts = 0
        self.connections = 0
        self.max_in_flight = self.in_flight

    def reset(self) -> None:
        """Zero every counter (``in_flight`` stays: those requests are still running)."""
        with self._lock:
            self._reset()

    def connection_opened(self) -> None:
        with self._lock:
            self.connections += 1

    def request_started(self, dialect: str) -> None:
        with self._lock:
            self.requests += 1
            self.by_dialect[dialect] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def request_finished(self, status: int | None, code: str | None) -> None:
        """Record the answer; ``status`` None means there was none (reset or shutdown)."""
        with self._lock:
            self.in_flight -= 1
            if status is None:
                return
            self.by_status[status] += 1
            if code is not None:
                self.by_code[code] += 1
            if status == 429:
                self.throttled += 1

    def connection_reset(self) -> None:
        with self._lock:
            self.resets += 1

    def timeout_injected(self) -> None:
        with self._lock:
            self.timeouts += 1

    def batch_seen(self, size: int) -> None:
        """A parsed request of ``size`` texts, valid or not (so an 11-text batch shows up)."""
        with self._lock:
            self.batch_sizes[size] += 1
            self.max_batch = max(self.max_batch, size)

    def embedded(self, texts: int, tokens: int) -> None:
        with self._lock:
            self.texts += texts
            self.tokens += tokens

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy. Histogram keys are ints here and strings once sent as JSON."""
        with self._lock:
            return {
                "requests": self.requests,
                "by_status": dict(self.by_status),
                "by_code": dict(self.by_code),
                "by_dialect": dict(self.by_dialect),
                "texts": self.texts,
                "tokens": self.tokens,
                "max_batch": self.max_batch,
                "batch_sizes": dict(sorted(self.batch_sizes.items())),
                "throttled": self.throttled,
                "resets": self.resets,
                "timeouts": self.timeouts,
                "connections": self.connections,
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
            }
