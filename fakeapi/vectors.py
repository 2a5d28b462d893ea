"""Deterministic fake embeddings: the vector is a pure function of the text (and the dimension).

Tests recompute ``fake_vector(text, dim)`` to prove that every id was stored with its own text's
vector (a client that places results by position instead of by index fails that check as soon as
the fake shuffles). The vector does not depend on ``text_type``, ``instruct`` or the dialect, so
the same text gives the same vector through either endpoint.
"""

from __future__ import annotations

import hashlib
import math
import threading
from functools import lru_cache

import numpy as np
import numpy.typing as npt
import pybase64

Vector = npt.NDArray[np.float32]


_local = threading.local()


def _generator(text: str) -> np.random.Generator:
    """This thread's generator, set to a state derived from sha256(text).

    Setting a PCG64 state directly costs ~1 µs, against ~8 µs to build a seeded generator, and a
    thread-local keeps concurrent callers (the server thread, the test thread) independent.
    """
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    try:
        bit_gen: np.random.PCG64 = _local.bit_gen
        gen: np.random.Generator = _local.gen
    except AttributeError:
        bit_gen = _local.bit_gen = np.random.PCG64()
        gen = _local.gen = np.random.Generator(bit_gen)
    bit_gen.state = {
        "bit_generator": "PCG64",
        "state": {
            "state": int.from_bytes(digest[:16], "little"),
            "inc": int.from_bytes(digest[16:], "little") | 1,
        },
        "has_uint32": 0,
        "uinteger": 0,
    }
    return gen


@lru_cache(maxsize=8192)
def fake_vector(text: str, dimension: int) -> Vector:
    """Unit-length float32 vector of ``dimension`` drawn from N(0, 1) seeded by sha256(text).

    About 15 µs for 1,024-d; the LRU cache makes repeats (tests recomputing expectations, a
    benchmark replaying a corpus) nearly free. The result is read-only because it is shared.
    A lower dimension is the renormalised prefix of a higher one, as with Matryoshka models.
    """
    if dimension <= 0:
        raise ValueError(f"dimension must be positive, got {dimension}")
    vec = _generator(text).standard_normal(dimension, dtype=np.float32)
    vec *= np.float32(1.0 / math.sqrt(float(np.dot(vec, vec))))
    vec.flags.writeable = False
    return vec


@lru_cache(maxsize=4096)
def fake_vector_b64(text: str, dimension: int) -> str:
    """``fake_vector`` as the OpenAI dialect's base64 of little-endian float32 (cached too).

    pybase64 (the worker's dependency): the same text as ``base64.b64encode`` in a tenth of
    the time, which was a third of the cost of an uncached vector.
    """
    return pybase64.b64encode(
        fake_vector(text, dimension).astype("<f4", copy=False).tobytes()
    ).decode("ascii")
