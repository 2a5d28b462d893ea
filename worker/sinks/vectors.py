"""pgvector's types for asyncpg, with a dense vector encoder that takes numpy arrays as they are.

pgvector-python's encoder wraps a numpy array in a ``Vector`` (a copy into an ``array('f')``),
then copies that to swap its bytes and again to prefix the header, step by step in Python:
3.8 % of py-spy's samples of the worker in benchmark scenario 1, where every row of the COPY
carries a 1024-d vector (~2.3 us per vector; numpy's cast and ``tobytes`` here take ~0.8 us).
The bytes are pgvector's binary format (the ``>HH`` header: the dimension and an unused zero,
then big-endian float32s), byte for byte what pgvector-python sends; anything else (a
``Vector``, a list) still goes through pgvector-python. Reads are pgvector-python's own: a
``vector`` column still comes back as a ``Vector``."""

from __future__ import annotations

import struct
from typing import Any

import asyncpg
import numpy as np
from pgvector import Vector
from pgvector.asyncpg import register_vector as register_pgvector

_HEADER = struct.Struct(">HH")
_BIG_ENDIAN_F4 = np.dtype(">f4")


def encode_vector(value: Any) -> bytes:
    """A dense vector in pgvector's binary format (what ``Vector(value).to_binary()`` sends)."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise ValueError("expected ndim to be 1")
        return _HEADER.pack(value.shape[0], 0) + value.astype(_BIG_ENDIAN_F4).tobytes()
    return (value if isinstance(value, Vector) else Vector(value)).to_binary()


async def register_vector(conn: asyncpg.Connection, schema: str = "public") -> None:
    """pgvector's codecs on ``conn`` (``vector``, ``halfvec``, ``sparsevec``), with
    ``encode_vector`` for ``vector``."""
    await register_pgvector(conn, schema=schema)
    await conn.set_type_codec(
        "vector",
        schema=schema,
        encoder=encode_vector,
        decoder=Vector.from_binary,
        format="binary",
    )
