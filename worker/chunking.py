"""Long texts into overlapping chunks that each fit a token budget (``oversize_policy = chunk``).

The splitter is ``semantic-text-splitter`` (Rust): it cuts at the largest semantic unit that
fits (paragraphs, then sentences, then words), so a chunk rarely ends mid-sentence. Its
sizes are counted with ``worker.tokens.estimate_tokens``, the same estimate that truncation,
the micro-batcher's token budget and the rate limiter use, so every chunk fits what the
provider takes exactly as a truncated text does.
"""

from __future__ import annotations

from functools import cache

from semantic_text_splitter import TextSplitter

from worker.tokens import estimate_tokens


@cache
def _splitter(max_tokens: int, overlap_tokens: int) -> TextSplitter:
    return TextSplitter.from_callback(estimate_tokens, max_tokens, overlap=overlap_tokens)


def split(text: str, max_tokens: int, overlap_tokens: int) -> list[str]:
    """``text`` as chunks of at most ``max_tokens`` (estimated), consecutive chunks sharing
    up to ``overlap_tokens``; one chunk (the text itself) when it fits. White space at a
    chunk's ends is trimmed, and a text of white space only has no chunk."""
    if estimate_tokens(text) <= max_tokens:
        return [text] if text.strip() else []
    return [c for c in _splitter(max_tokens, overlap_tokens).chunks(text) if c.strip()]
