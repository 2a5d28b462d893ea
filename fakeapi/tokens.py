"""The fake's stand-in for the provider tokenizer (Qwen3's BPE is neither needed nor shipped).

The fake needs a token count for three things: the 8,192-tokens-per-text limit, ``usage`` in the
response, and the TPM quota. Real BPE is not required for that, only a count of the right order:

* one token per CJK ideograph, Hiragana, Katakana or Hangul character (what Qwen tokenizers do
  for most of them);
* one token per run of letters (a word), per run of digits, and per other visible character
  (punctuation, symbols, emoji).

The worker budgets batches with its own cheap estimate, ``ceil(utf8_bytes / 3)``. That estimate is
designed to be >= this count for natural text: a word of n >= 2 letters plus its separating space
is >= 3 bytes, and every CJK/Hangul character is 3 UTF-8 bytes and one token here. Pathological
input can break the inequality (single letters or punctuation marks separated by spaces:
``"a b c"`` is 5 bytes and 3 tokens), which is exactly why the fake enforces its own limit and the
worker must treat the provider's 400 as the final word.
"""

from __future__ import annotations

import re

_CJK = (
    "\u1100-\u11ff"  # Hangul Jamo
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3130-\u318f"  # Hangul compatibility Jamo
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uac00-\ud7af"  # Hangul syllables
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\uff66-\uff9f"  # half-width Katakana
    "\U00020000-\U0003134f"  # CJK extensions B-G
)

# Order matters: CJK characters are also \w letters, so they must match before the word rule.
_TOKEN_RE = re.compile(rf"[{_CJK}]|\d+|[^\W\d_{_CJK}]+|[^\w\s]|_+")


def tokenize(text: str) -> list[str]:
    """Split ``text`` into the fake's tokens (what it bills and limits by)."""
    return _TOKEN_RE.findall(text)


def count_tokens(text: str) -> int:
    """Number of tokens the fake bills and limits ``text`` by."""
    return len(_TOKEN_RE.findall(text))
