"""DashScope's sparse_embedding into a sparsevec: the index limit, the column's bound."""

from __future__ import annotations

import pytest

from worker.embedding.providers.base import SPARSE_MAX_ENTRIES, ConfigurationFault
from worker.embedding.providers.dashscope import SPARSE_DIMENSION, sparse_vector
from worker.sinks.migrate import default_directory


def test_keeps_the_heaviest_entries_that_an_index_takes() -> None:
    weights = {i: (i % 97) / 10 + 0.01 for i in range(1500)}
    vector = sparse_vector([{"index": i, "value": w, "token": f"t{i}"} for i, w in weights.items()])
    assert vector.dimensions() == SPARSE_DIMENSION
    assert len(vector.indices()) == SPARSE_MAX_ENTRIES == 1000
    kept = set(vector.indices())
    lightest_kept = min(vector.values())
    assert all(w <= lightest_kept for i, w in weights.items() if i not in kept)
    assert vector.indices() == sorted(kept)  # pgvector's order


def test_zeros_dropped_repeats_summed() -> None:
    vector = sparse_vector(
        [
            {"index": 9, "value": 0.0, "token": "a"},
            {"index": 5, "value": 0.25, "token": "b"},
            {"index": 5, "value": 0.5, "token": "b"},
        ]
    )
    assert vector.indices() == [5] and vector.values() == [0.75]
    assert sparse_vector([]).indices() == []


def test_an_index_past_the_column_is_a_configuration_fault() -> None:
    with pytest.raises(ConfigurationFault, match="0008_sparse"):
        sparse_vector([{"index": SPARSE_DIMENSION, "value": 1.0, "token": "x"}])


def test_the_migration_makes_the_column_the_provider_fills() -> None:
    sql = (default_directory() / "0008_sparse.sql").read_text()
    assert f"sparse sparsevec({SPARSE_DIMENSION})" in sql
