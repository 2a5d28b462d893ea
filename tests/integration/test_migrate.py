"""The migration runner against a real Postgres: order, idempotence, checksums, the lock."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import Env
from worker.sinks.migrate import MigrationError, default_directory, discover, migrate


def _copy_migrations(tmp_path: Path) -> Path:
    target = tmp_path / "migrations"
    shutil.copytree(default_directory(), target)
    return target


async def test_applies_in_order_once_with_the_dimension(env: Env, tmp_path: Path) -> None:
    directory = _copy_migrations(tmp_path)
    shipped = sorted(p.name for p in directory.glob("*.sql"))
    (directory / "0099_extra.sql").write_text("CREATE TABLE extra (x integer);")
    conn = await asyncpg.connect(env.dsn)
    try:
        assert await migrate(conn, 384, directory) == [*shipped, "0099_extra.sql"]
        assert await migrate(conn, 384, directory) == []
        typmod = await conn.fetchval(
            "SELECT atttypmod FROM pg_attribute "
            "WHERE attrelid = 'embeddings'::regclass AND attname = 'embedding'"
        )
        assert typmod == 384
        recorded = await conn.fetch("SELECT version, dimension FROM schema_migrations ORDER BY 1")
        versions = [int(name[:4]) for name in [*shipped, "0099_extra.sql"]]
        assert [(r["version"], r["dimension"]) for r in recorded] == [(v, 384) for v in versions]
    finally:
        await conn.close()


async def test_an_edited_applied_file_is_refused(env: Env, tmp_path: Path) -> None:
    directory = _copy_migrations(tmp_path)
    conn = await asyncpg.connect(env.dsn)
    try:
        await migrate(conn, 64, directory)
        path = directory / "0001_embeddings.sql"
        path.write_text(path.read_text() + "\n-- edited\n")
        with pytest.raises(MigrationError, match="edited after it was applied"):
            await migrate(conn, 64, directory)
    finally:
        await conn.close()


async def test_a_failing_migration_leaves_nothing_behind(env: Env, tmp_path: Path) -> None:
    directory = _copy_migrations(tmp_path)
    (directory / "0099_broken.sql").write_text("CREATE TABLE half (x int); SELECT nonsense;")
    conn = await asyncpg.connect(env.dsn)
    try:
        with pytest.raises(asyncpg.PostgresError):
            await migrate(conn, 64, directory)
        assert await conn.fetchval("SELECT to_regclass('half')") is None
        versions = await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")
        shipped = sorted(int(p.name[:4]) for p in default_directory().glob("*.sql"))
        assert [r["version"] for r in versions] == shipped, "only the good files applied"
    finally:
        await conn.close()


async def test_concurrent_runs_apply_each_migration_once(env: Env) -> None:
    """Several replicas starting together: the advisory lock serialises them."""
    conns = [await asyncpg.connect(env.dsn) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate(c, 128) for c in conns))
        shipped = len(list(default_directory().glob("*.sql")))
        assert sorted(len(r) for r in results) == [0, 0, shipped]
    finally:
        for c in conns:
            await c.close()


def test_discover_rejects_badly_named_files(tmp_path: Path) -> None:
    (tmp_path / "init.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"NNNN_name\.sql"):
        discover(tmp_path)


def test_discover_rejects_duplicate_versions(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0001_b.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="share a version"):
        discover(tmp_path)
