"""Token estimates, because the provider's tokenizer is not available on the hot path.

Qwen (text-embedding-v4) uses a byte-level BPE: a text never has more tokens than UTF-8
bytes, English averages about 4-5 bytes per token, and **every digit is a token of its
own**. The estimate is ``ceil((3 * utf8_bytes + 6 * ascii_digits) / 8)``: 0.375 tokens per
byte plus 0.75 more per digit. Measured against the Qwen tokenizer the ``dashscope`` SDK
ships (docs/architecture.md, "Token counts"), it is at or above the real count for every
document of ~600+ tokens made of the development sets (English news, posts and intents; SMS;
system logs, full of digits; ten languages of xSID), 1.6-1.9x for English prose and 1.0-1.3x
for logs, SMS and Serbian, where the former ``bytes / 3`` fell to 0.48x. Short texts can
still be under (a few digits or rare words); only a text near the per-text limit can be
refused for it, and the embedding stage then cuts that one text again (``recut_to_fit``)
instead of dead-lettering it. Batch and quota budgets use the estimate only until the
provider's ``usage`` corrects them.
"""

from __future__ import annotations

_DIGITS = b"0123456789"


def _estimate(raw: bytes) -> int:
    digits = len(raw) - len(raw.translate(None, _DIGITS))
    return -(-(3 * len(raw) + 6 * digits) // 8)


def estimate_tokens(text: str) -> int:
    return _estimate(text.encode("utf-8"))


def truncate_to_tokens(text: str, max_tokens: int) -> str:
    """The longest prefix of ``text`` whose estimate fits ``max_tokens``, on a character
    boundary."""
    raw = text.encode("utf-8")
    if _estimate(raw) <= max_tokens:
        return text
    # Without digits the cut is at 8/3 bytes per token; each digit costs 2 more bytes' worth:
    # shrink until it fits, then grow back a character at a time while it still does.
    end = min(len(raw), max_tokens * 8 // 3)
    while end > 0 and _estimate(raw[:end]) > max_tokens:
        over = _estimate(raw[:end]) - max_tokens
        end = max(0, end - max(1, over * 8 // 9))
    cut = raw[:end].decode("utf-8", errors="ignore")
    for char in text[len(cut) :]:
        longer = cut + char
        if estimate_tokens(longer) > max_tokens:
            break
        cut = longer
    return cut


def recut_to_fit(text: str, limit: int) -> str:
    """A prefix of ``text`` the provider cannot count above ``limit`` tokens: byte-level BPE
    (and WordPiece or SentencePiece) never makes more tokens than bytes, plus two for the
    special tokens some servers add. For the rare text the estimate undercounts."""
    return text.encode("utf-8")[: max(1, limit - 2)].decode("utf-8", errors="ignore")
