"""The search-speed benchmark's texts: queries are never among the stored rows, and the
split is the same on every run (the vectors are cached by text, the figures name the rows)."""

from __future__ import annotations

import pytest

from benchmarks.search_rows import split

POOL = [f"tweet number {i}" for i in range(50)]


def test_queries_are_disjoint_from_rows_and_the_split_is_fixed() -> None:
    first = split(POOL, 5, 40)
    assert len(first.queries) == 5 and len(first.rows) == 40
    assert not set(first.queries) & set(first.rows)
    assert len(set(first.rows)) == 40
    assert split(POOL, 5, 40) == first
    assert first.rows[:10] != POOL[5:15]  # shuffled, not the sorted pool's order


def test_asking_for_more_texts_than_the_pool_holds_stops() -> None:
    with pytest.raises(SystemExit, match="only 50 distinct texts"):
        split(POOL, 10, 41)
