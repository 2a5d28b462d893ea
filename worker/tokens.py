"""Conservative token estimates, because the provider's tokenizer is not available offline.

Qwen3 (text-embedding-v4) uses a byte-level BPE, so a text never has more tokens than UTF-8
bytes. Real text averages about 4 bytes per token in English and 3 bytes per token for CJK
(one 3-byte character is usually one token). We estimate ``ceil(utf8_bytes / 3)``: above
the real count for natural text in any script, so batches stay inside the provider's
limits, at the cost of some slack for English (batches of ~75% of the possible size) and
of truncating English a little early. Pathological strings (random ASCII, long digit runs)
can exceed the estimate; the provider then answers 400 and the item is isolated and
dead-lettered, never retried as-is.
"""

from __future__ import annotations

BYTES_PER_TOKEN = 3


def estimate_tokens(text: str) -> int:
    return -(-len(text.encode("utf-8")) // BYTES_PER_TOKEN)


def truncate_to_tokens(text: str, max_tokens: int) -> str:
    """Cut ``text`` so that its estimate fits ``max_tokens``, on a character boundary."""
    limit = max_tokens * BYTES_PER_TOKEN
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", errors="ignore")
