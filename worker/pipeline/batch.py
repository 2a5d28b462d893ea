"""Group texts into provider requests: flush at max texts, a token budget, or a linger time.

Pure bookkeeping with an injected clock, so it is tested without sleeping; the pipeline
calls ``add`` for each change and ``due`` when the earliest linger deadline passes. Texts
of different ``text_type`` never share a request (the provider takes one per request).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.events import TextType
from worker.model import Change


@dataclass
class _Open:
    started: float
    items: list[Change] = field(default_factory=list)
    tokens: int = 0


class MicroBatcher:
    def __init__(self, max_texts: int, max_tokens: int, linger_s: float) -> None:
        self.max_texts = max_texts
        self.max_tokens = max_tokens
        self.linger_s = linger_s
        self._open: dict[TextType, _Open] = {}

    def __len__(self) -> int:
        return sum(len(b.items) for b in self._open.values())

    def add(self, change: Change, now: float) -> list[list[Change]]:
        """Add one change; return the batches this closes (zero, one or two)."""
        ready: list[list[Change]] = []
        batch = self._open.get(change.text_type)
        if batch is not None and batch.tokens + change.tokens > self.max_tokens:
            ready.append(self._close(change.text_type))
            batch = None
        if batch is None:
            batch = self._open[change.text_type] = _Open(started=now)
        batch.items.append(change)
        batch.tokens += change.tokens
        if len(batch.items) >= self.max_texts or batch.tokens >= self.max_tokens:
            ready.append(self._close(change.text_type))
        return ready

    def due(self, now: float) -> list[list[Change]]:
        """Batches whose linger time has passed."""
        expired = [t for t, b in self._open.items() if now - b.started >= self.linger_s]
        return [self._close(t) for t in expired]

    def drain(self) -> list[list[Change]]:
        return [self._close(t) for t in list(self._open)]

    def next_deadline(self) -> float | None:
        if not self._open:
            return None
        return min(b.started for b in self._open.values()) + self.linger_s

    def _close(self, text_type: TextType) -> list[Change]:
        return self._open.pop(text_type).items
