"""The pipeline's counters: each stage adds to its own, metrics and the summary read them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Stats:
    consumed: int = 0  # decode
    stored: int = 0  # write: rows inserted or re-embedded
    deleted: int = 0  # write: delete events applied
    unchanged: int = 0  # dedupe
    dead_lettered: Counter[str] = field(default_factory=Counter)
    batches: int = 0  # dispatch, from here to throttled
    texts_embedded: int = 0
    chunked: int = 0  # decode: documents split into chunks (oversize_policy = chunk)
    chunks: int = 0  # decode: their chunks, each a text to embed and a row
    tokens_estimated: int = 0
    requests: int = 0
    retries: int = 0
    retries_by_cause: Counter[str] = field(default_factory=Counter)
    throttled: int = 0
    sparse_vectors: int = 0  # with output_type dense&sparse: vectors received,
    sparse_entries: int = 0  # their non-zero entries,
    sparse_at_cap: int = 0  # and those at the 1,000-entry cap (lightest tokens dropped)
    transactions: int = 0  # write
    # reembed.dual_write, per target: rows written into it, requests sent to its provider,
    # and rows left to the re-embed's catch-up, per (target, reason).
    dual_written: Counter[str] = field(default_factory=Counter)
    dual_requests: Counter[str] = field(default_factory=Counter)
    dual_left: Counter[tuple[str, str]] = field(default_factory=Counter)
