"""store.write: small writes in one statement; from ``DIRECT_FROM_ROWS`` rows on, new keys
are copied straight in and the rest guarded; races fall back safely."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import numpy as np
import pytest
from pgvector import SparseVector
from pgvector.asyncpg import register_vector as register_pgvector

from tests.conftest import Env, migrate_db
from tests.factories import upsert
from worker.embedding.providers.dashscope import SPARSE_DIMENSION
from worker.model import Change
from worker.sinks import postgres as store

DIM = 8
GROUP = "g"


@pytest.fixture
async def conn(env: Env) -> AsyncIterator[asyncpg.Connection]:
    await migrate_db(env, DIM)
    c = await env.connect()
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture(params=["one-statement", "direct-copy"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both write paths: the same semantics whatever the batch's size."""
    monkeypatch.setattr(store, "DIRECT_FROM_ROWS", 10**9 if request.param == "one-statement" else 1)
    return str(request.param)


@pytest.fixture
def direct(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "DIRECT_FROM_ROWS", 1)


def embedded(offset: int, id: str, when: datetime, value: float = 1.0) -> Change:
    change = upsert(offset, f"text {id} {offset}", id=id)
    change.event_time = when
    change.vector = np.full(DIM, value, dtype=np.float32)
    return change


def deleted(offset: int, id: str, when: datetime) -> Change:
    change = upsert(offset, "", id=id)
    change.op = "delete"
    change.event_time = when
    return change


async def write(conn: asyncpg.Connection, changes: list[Change]) -> store.WriteResult:
    offsets = {("t", 0): max(c.offset for c in changes) + 1}
    return await store.write(conn, changes, offsets, GROUP, "m", DIM)


async def rows(conn: asyncpg.Connection) -> dict[str, tuple[int, float, int]]:
    found = await conn.fetch("SELECT id, version, embedding, source_offset FROM embeddings")
    return {
        r["id"]: (r["version"], float(r["embedding"].to_numpy()[0]), r["source_offset"])
        for r in found
    }


async def test_new_and_existing_keys_in_one_batch(conn: asyncpg.Connection, path: str) -> None:
    t0 = datetime.now(UTC)
    first = await write(conn, [embedded(0, "a", t0), embedded(1, "b", t0)])
    assert first.upserted == 2
    assert await rows(conn) == {"a": (1, 1.0, 0), "b": (1, 1.0, 1)}
    # "a" updated (guarded path), "c" new (direct path), "b" older than stored: ignored.
    later = t0 + timedelta(seconds=1)
    second = await write(
        conn,
        [
            embedded(2, "a", later, 2.0),
            embedded(3, "c", later),
            embedded(4, "b", t0 - timedelta(1)),
        ],
    )
    assert second.upserted == 2
    assert await rows(conn) == {"a": (2, 2.0, 2), "b": (1, 1.0, 1), "c": (1, 1.0, 3)}
    assert await store.load_offsets(conn, GROUP, "t") == {0: 5}
    # A replay changes nothing.
    again = await write(
        conn,
        [
            embedded(2, "a", later, 2.0),
            embedded(3, "c", later),
            embedded(4, "b", t0 - timedelta(1)),
        ],
    )
    assert again.upserted == 0
    assert await rows(conn) == {"a": (2, 2.0, 2), "b": (1, 1.0, 1), "c": (1, 1.0, 3)}


async def test_vectors_are_stored_bit_for_bit(env: Env, path: str) -> None:
    """The worker's connection (its own vector encoder) stores each float32 exactly, read
    back by pgvector-python's plain codec; a NaN is refused by pgvector, as it always was."""
    await migrate_db(env, DIM)
    values = np.random.default_rng(3).standard_normal((3, DIM)).astype(np.float32)
    values[0, :4] = [-0.0, 1e-45, 3.4e38, -3.4e38]
    t0 = datetime.now(UTC)
    changes = [embedded(i, f"v{i}", t0) for i in range(3)]
    for change, value in zip(changes, values, strict=True):
        change.vector = value
    conn = await store.connect(env.dsn, DIM)
    plain = await asyncpg.connect(env.dsn)
    try:
        assert (await write(conn, changes)).upserted == 3
        await register_pgvector(plain)
        found = await plain.fetch("SELECT id, embedding FROM embeddings ORDER BY id")
        stored = np.stack([r["embedding"].to_numpy() for r in found])
        assert stored.tobytes() == values.tobytes()
        nan = embedded(3, "nan", t0)
        assert nan.vector is not None
        nan.vector[1] = np.nan
        with pytest.raises(asyncpg.DataError, match="NaN not allowed in vector"):
            await write(conn, [nan])
    finally:
        await conn.close()
        await plain.close()


async def test_a_newer_tombstone_keeps_an_older_upsert_out(
    conn: asyncpg.Connection, path: str
) -> None:
    t0 = datetime.now(UTC)
    await write(conn, [deleted(5, "x", t0)])
    result = await write(conn, [embedded(6, "x", t0 - timedelta(seconds=1))])
    assert result.upserted == 0 and await rows(conn) == {}
    # A newer upsert than the tombstone is applied.
    result = await write(conn, [embedded(7, "x", t0 + timedelta(seconds=1))])
    assert result.upserted == 1 and set(await rows(conn)) == {"x"}


async def test_a_row_inserted_in_between_falls_back_to_the_guarded_path(
    conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch, direct: None
) -> None:
    t0 = datetime.now(UTC)
    await write(conn, [embedded(0, "a", t0)])
    # As if another writer inserted "a" after the existence check: the COPY hits the key.
    monkeypatch.setattr(store, "EXISTING", "SELECT $1::text[], $2::text[] WHERE false")
    result = await write(conn, [embedded(1, "a", t0 + timedelta(seconds=1), 3.0)])
    assert result.upserted == 1
    assert await rows(conn) == {"a": (2, 3.0, 1)}


async def test_a_delete_committed_in_between_falls_back_to_the_guarded_path(
    conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch, direct: None
) -> None:
    t0 = datetime.now(UTC)
    await write(conn, [deleted(5, "y", t0)])
    # As if the tombstone committed after the existence check: the second look sees it.
    monkeypatch.setattr(store, "EXISTING", "SELECT $1::text[], $2::text[] WHERE false")
    result = await write(conn, [embedded(4, "y", t0 - timedelta(seconds=1)), embedded(6, "z", t0)])
    assert result.upserted == 1
    assert set(await rows(conn)) == {"z"}


async def test_within_joins_the_transaction_and_its_redo(
    conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch, direct: None
) -> None:
    await conn.execute("CREATE TABLE side (n int)")
    calls = 0

    async def within(c: store.Conn) -> None:
        nonlocal calls
        calls += 1
        await c.execute("INSERT INTO side VALUES ($1)", calls)

    t0 = datetime.now(UTC)
    await write(conn, [embedded(0, "a", t0)])
    # Forced onto the redo path: both redo triggers fire before ``within``, so it runs once,
    # in the transaction that commits.
    monkeypatch.setattr(store, "EXISTING", "SELECT $1::text[], $2::text[] WHERE false")
    offsets = {("t", 0): 2}
    change = embedded(1, "a", t0 + timedelta(seconds=1))
    await store.write(conn, [change], offsets, GROUP, "m", DIM, within=within)
    assert calls == 1
    assert [r["n"] for r in await conn.fetch("SELECT n FROM side")] == [1]
    assert await rows(conn) == {"a": (2, 1.0, 1)}


async def test_a_failing_within_leaves_neither_rows_nor_offsets(
    conn: asyncpg.Connection, path: str
) -> None:
    async def within(c: store.Conn) -> None:
        raise RuntimeError("analysis failed")

    t0 = datetime.now(UTC)
    changes = [embedded(0, "a", t0), deleted(1, "b", t0)]
    with pytest.raises(RuntimeError):
        await store.write(conn, changes, {("t", 0): 2}, GROUP, "m", DIM, within=within)
    assert await rows(conn) == {}
    assert await store.load_offsets(conn, GROUP, "t") == {}
    assert await conn.fetchval("SELECT count(*) FROM embedding_tombstones") == 0


async def test_sparse_vectors_ride_with_their_rows_on_both_paths(
    conn: asyncpg.Connection, path: str
) -> None:
    """New keys (copied in on the direct path) and changed ones (guarded upsert) store the
    change's sparse vector; a row without one stores NULL, and an update replaces it."""
    when = datetime(2024, 1, 1, tzinfo=UTC)
    first = [embedded(i, f"k{i}", when) for i in range(4)]
    for i, change in enumerate(first[:3]):
        change.sparse = SparseVector({i: 0.5, 100 + i: 1.5}, SPARSE_DIMENSION)
    await write(conn, first)
    later = embedded(10, "k0", when + timedelta(seconds=1))
    later.sparse = SparseVector({7: 2.0}, SPARSE_DIMENSION)
    await write(conn, [later, embedded(11, "k5", when)])
    stored = {
        r["id"]: r["sparse"]
        for r in await conn.fetch("SELECT id, sparse FROM embeddings ORDER BY id")
    }
    assert stored["k0"] == SparseVector({7: 2.0}, SPARSE_DIMENSION)
    assert stored["k1"] == SparseVector({1: 0.5, 101: 1.5}, SPARSE_DIMENSION)
    assert stored["k2"] == SparseVector({2: 0.5, 102: 1.5}, SPARSE_DIMENSION)
    assert stored["k3"] is None and stored["k5"] is None
