"""The dense vector encoder sends what pgvector-python's own encoder sends, byte for byte."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from pgvector import Vector

from worker.sinks.vectors import encode_vector

RNG = np.random.default_rng(7)
SPECIAL = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-45, 3.4e38, -1.5], dtype=np.float32)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(RNG.standard_normal(1024).astype(np.float32), id="float32"),
        pytest.param(RNG.standard_normal(3), id="float64"),
        pytest.param(np.arange(5), id="int64"),
        pytest.param(SPECIAL, id="nan-inf-zero-extremes"),
        pytest.param(SPECIAL.astype(np.float64), id="float64-nan-inf"),
        pytest.param(np.array([1e300, -1e300]), id="float64-past-float32"),
        pytest.param(RNG.standard_normal(8).astype(np.float32)[::2], id="strided"),
        pytest.param(RNG.standard_normal(4).astype(">f4"), id="big-endian"),
        pytest.param(np.array([], dtype=np.float32), id="empty"),
    ],
)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # both encoders: inf
def test_an_array_is_encoded_as_pgvector_encodes_it(value: np.ndarray) -> None:
    expected = Vector(value).to_binary()
    assert encode_vector(value) == expected


def test_nan_keeps_its_bits() -> None:
    # A NaN with a payload: pgvector-python passes the bits through, and so does this.
    value = np.frombuffer(struct.pack("<I", 0x7FC00123), dtype=np.float32)
    assert encode_vector(value) == Vector(value).to_binary()
    assert encode_vector(value)[4:] == struct.pack(">I", 0x7FC00123)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param([1.0, 2.5, float("nan")], id="list"),
        pytest.param(Vector([1.0, -2.0]), id="vector"),
    ],
)
def test_other_values_take_pgvectors_encoder(value: Any) -> None:
    expected = (value if isinstance(value, Vector) else Vector(value)).to_binary()
    assert encode_vector(value) == expected


def test_the_encoding_reads_back_as_the_array() -> None:
    value = np.concatenate([RNG.standard_normal(16).astype(np.float32), SPECIAL])
    read = Vector.from_binary(encode_vector(value)).to_numpy()
    np.testing.assert_array_equal(read, value)  # NaNs compare equal here


@pytest.mark.parametrize(
    "value", [np.zeros((2, 2), dtype=np.float32), np.array(1.0, dtype=np.float32)], ids=["2d", "0d"]
)
def test_an_array_that_is_not_one_vector_is_refused_alike(value: np.ndarray) -> None:
    with pytest.raises(ValueError, match="expected ndim to be 1") as pgvector_error:
        Vector(value)
    with pytest.raises(ValueError, match="expected ndim to be 1") as ours:
        encode_vector(value)
    assert str(ours.value) == str(pgvector_error.value)


def test_too_many_dimensions_are_refused_alike() -> None:
    value = np.zeros(65_536, dtype=np.float32)
    with pytest.raises(struct.error):
        Vector(value).to_binary()
    with pytest.raises(struct.error):
        encode_vector(value)


def test_something_else_is_refused_alike() -> None:
    with pytest.raises(ValueError, match="expected list or ndarray"):
        encode_vector("1,2")
