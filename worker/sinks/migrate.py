"""Apply the SQL files in ``migrations/`` in order, once each, under an advisory lock.

Each file is recorded with the SHA-256 of its text; an applied file that was edited since is
refused, because the database would no longer match what the file says. Files may use the
placeholder ``{{dimension}}`` (the configured vector dimension), which is why the dimension
is recorded too: changing it later is a model migration, not a configuration tweak. The
placeholder ``{{text_search_config}}`` (``search.text_search_config``) is fixed the same way:
lexical search and its optional index read it, so a later, different setting is refused.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import structlog

log = structlog.get_logger(__name__)

# Any constant works; it only has to be the same for every replica.
LOCK_ID = 0x656D6277  # "embw"
FILE_PATTERN = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# A (schema-qualified) identifier: it is pasted into SQL, so nothing else passes.
TEXT_SEARCH_CONFIG = re.compile(r"([a-z_][a-z0-9_]*\.)?[a-z_][a-z0-9_]*")
DEFAULT_TEXT_SEARCH_CONFIG = "simple"


class MigrationError(Exception):
    """The database and the migration files disagree; nothing was changed."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    def render(self, dimension: int, text_search_config: str = DEFAULT_TEXT_SEARCH_CONFIG) -> str:
        if not TEXT_SEARCH_CONFIG.fullmatch(text_search_config):
            raise MigrationError(f"{text_search_config!r} is not a text search configuration name")
        return self.sql.replace("{{dimension}}", str(int(dimension))).replace(
            "{{text_search_config}}", text_search_config
        )


def default_directory() -> Path:
    """`migrations/` beside the package in a checkout, or /app/migrations in the image."""
    here = Path(__file__).resolve().parents[2] / "migrations"
    return here if here.is_dir() else Path.cwd() / "migrations"


def discover(directory: Path) -> list[Migration]:
    if not directory.is_dir():
        raise MigrationError(f"migrations directory {directory} does not exist")
    found: list[Migration] = []
    for path in sorted(directory.iterdir()):
        if path.suffix != ".sql":
            continue
        match = FILE_PATTERN.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql")
        found.append(Migration(int(match.group(1)), path.name, path.read_text("utf-8")))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a version number")
    return found


async def migrate(
    conn: asyncpg.Connection,
    dimension: int,
    directory: Path | None = None,
    text_search_config: str = DEFAULT_TEXT_SEARCH_CONFIG,
) -> list[str]:
    """Apply pending migrations; return the names applied (empty when up to date)."""
    migrations = discover(directory or default_directory())
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_ID)
    try:
        await _create_first_schema(conn)
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer PRIMARY KEY,
                name       text        NOT NULL,
                checksum   text        NOT NULL,
                dimension  integer     NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
        applied = {r["version"]: r for r in rows}
        known = {m.version for m in migrations}
        for version, row in applied.items():
            if version not in known:
                raise MigrationError(
                    f"the database has migration {row['name']} which is not among the files "
                    "(is this an older worker version?)"
                )
        done: list[str] = []
        for m in migrations:
            previous = applied.get(m.version)
            if previous is not None:
                if previous["checksum"] != m.checksum:
                    raise MigrationError(
                        f"{m.name} was edited after it was applied (checksum "
                        f"{previous['checksum'][:12]} in the database, {m.checksum[:12]} on disk); "
                        "add a new migration instead of editing an applied one"
                    )
                continue
            async with conn.transaction():
                await conn.execute(m.render(dimension, text_search_config))
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum, dimension) "
                    "VALUES ($1, $2, $3, $4)",
                    m.version,
                    m.name,
                    m.checksum,
                    dimension,
                )
            log.info("migration applied", migration=m.name)
            done.append(m.name)
        await _check_text_search_config(conn, text_search_config)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_ID)


async def _create_first_schema(conn: asyncpg.Connection) -> None:
    """A DSN may name its own schema first (``?search_path=media,public``: a multimodal
    deployment's tables, docs/multimodal.md); Postgres skips a schema that does not exist,
    which would put its tables in the next one: create it. The ``vector`` extension goes to
    ``public`` (for a text deployment there too), which the search path must name."""
    first = (await conn.fetchval("SHOW search_path")).split(",")[0].strip()
    if first and first != '"$user"':
        name = first[1:-1].replace('""', '"') if first.startswith('"') else first
        exists = await conn.fetchval("SELECT to_regnamespace($1) IS NOT NULL", first)
        if not exists:
            await conn.execute(f"CREATE SCHEMA {_quoted(name)}")
        # pgvector's types belong where every deployment finds them, not in this schema.
        await conn.execute("CREATE EXTENSION IF NOT EXISTS vector SCHEMA public")


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _check_text_search_config(conn: asyncpg.Connection, wanted: str) -> None:
    """Lexical search (and its index, if built) reads the configuration fixed the day 0006
    was applied: a different setting now would say one thing and do another."""
    if await conn.fetchval("SELECT to_regproc('embeddings_text_config')") is None:
        return  # a directory without 0006 (tests of the runner itself)
    applied = await conn.fetchval("SELECT embeddings_text_config()::text")
    if applied.removeprefix("pg_catalog.") != wanted.removeprefix("pg_catalog."):
        raise MigrationError(
            f"search.text_search_config is {wanted!r} but the table's lexical search uses "
            f"{applied!r}; set it back, or change the table's (see docs/retrieval.md)"
        )
