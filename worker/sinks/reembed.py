"""The SQL of re-embeds (``reembed_targets``, migration 0011): a target's table beside
``embeddings``, its passes, the switch and the drop.

A target's table ``reembed_<name>`` is created ``LIKE embeddings INCLUDING ALL``, so it has
whatever columns and indexes the current table has (its primary key too, whatever its
columns), except the indexes on ``embedding``, which are for the old dimension; the vector
column is retyped to the target's dimension, and a CHECK admits only the target's model and
dimension (the guard: no row of another model or dimension can ever be written into it).

A pass walks ``embeddings`` in primary-key order, a page at a time. Each row of the page is
compared with the target's: missing, or other content (hash, text type): embed it; the
same content but another version (metadata, source offset): copy the columns, no request;
a target row whose key is no longer in ``embeddings``: delete it. A page's rows are written
joined with ``embeddings`` on the content hash read, so a row changed since it was read is
not written with the old text's vector (the next pass takes it). The page's rows and the
cursor (its last key) are one transaction: a killed pass resumes after its last page, and
redoes nothing stored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pgvector import Vector

from worker.config import ConfigError
from worker.events import TextType
from worker.sinks.postgres import Conn, SchemaError
from worker.tokens import estimate_tokens

CURRENT = "embeddings"
NAME = re.compile(r"[a-z][a-z0-9_]{0,29}")
# Columns a target row gets from the target, not from ``embeddings``.
OWN = ("embedding", "model", "dimension", "sparse")
# Version columns: a row whose values differ here (same content) is copied, not embedded.
VERSION = ("version", "source_offset", "event_time", "updated_at", "metadata")
GUARD = "reembed_guard"
# Tables beside ``embeddings`` with a vector column of the configured dimension, their rows
# keyed by model (analysis, profiles): a switch to another dimension moves their rows aside
# (``<table>_before_<name>``, dropped with the rest) and retypes the column.
DERIVED = (("label_vectors", "embedding"), ("analysis_points", "embedding"), ("profiles", "mean"))


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise ConfigError(
            f"reembed: target name {name!r}: lower-case letters, digits and _, starting with "
            "a letter, at most 30 characters"
        )
    return name


def table_of(name: str) -> str:
    return f"reembed_{name}"


def retired_of(name: str) -> str:
    """``embeddings`` after the switch to ``name``, until ``drop``."""
    return f"embeddings_before_{name}"


@dataclass
class Target:
    name: str
    provider: dict[str, Any]
    model: str
    dimension: int
    state: str = "filling"
    cursor: list[Any] | None = None
    passes: int = 0
    embedded: int = 0
    copied: int = 0
    tokens: int = 0
    job: dict[str, Any] | None = None  # ``--via batch``: the page's batch job (migration 0011)

    @property
    def table(self) -> str:
        return table_of(self.name)


@dataclass(frozen=True)
class Shape:
    """The current table's primary key (names and types) and writable columns."""

    key: tuple[str, ...]
    key_types: tuple[str, ...]
    columns: tuple[str, ...]


@dataclass
class Row:
    """A row of ``embeddings`` to embed for the target (``EmbedStage``'s ``Embeddable``)."""

    key: tuple[Any, ...]
    namespace: str
    id: str
    text: str
    text_type: TextType
    content_hash: bytes
    tokens: int
    source: tuple[str, int, int]
    vector: Any = None
    sparse: Any = None
    truncated: bool = False  # set by the stage when it cuts a refused text again


@dataclass
class Page:
    """One page of a pass: what to embed, copy and delete, and where the page ends."""

    embed: list[Row] = field(default_factory=list)
    copy: list[tuple[tuple[Any, ...], bytes]] = field(default_factory=list)
    no_content: list[Row] = field(default_factory=list)
    rows: int = 0  # rows of ``embeddings`` the page covers
    last: tuple[Any, ...] | None = None
    end: bool = False  # the last page of the pass


async def shape(conn: Conn, table: str = CURRENT) -> Shape:
    key = await conn.fetch(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type "
        "FROM pg_index i JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, n) ON true "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
        "WHERE i.indrelid = to_regclass($1) AND i.indisprimary ORDER BY k.n",
        table,
    )
    columns = await conn.fetch(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 "
        "AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
        table,
    )
    if not key:
        raise SchemaError(f"table `{table}` has no primary key")
    return Shape(
        tuple(r["attname"] for r in key),
        tuple(r["type"] for r in key),
        tuple(r["attname"] for r in columns),
    )


def _target(row: Any) -> Target:
    return Target(
        row["name"],
        json.loads(row["provider"]),
        row["model"],
        row["dimension"],
        row["state"],
        None if row["cursor"] is None else json.loads(row["cursor"]),
        row["passes"],
        row["embedded"],
        row["copied"],
        row["tokens"],
        None if row["job"] is None else json.loads(row["job"]),
    )


async def load(conn: Conn, name: str) -> Target | None:
    row = await conn.fetchrow("SELECT * FROM reembed_targets WHERE name = $1", name)
    return None if row is None else _target(row)


async def all_targets(conn: Conn) -> list[Target]:
    return [_target(r) for r in await conn.fetch("SELECT * FROM reembed_targets ORDER BY name")]


async def create(
    conn: Conn, name: str, provider: dict[str, Any], model: str, dimension: int
) -> Target:
    """The target's row and table, in one transaction."""
    table = table_of(name)
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO reembed_targets (name, provider, model, dimension) "
            "VALUES ($1, $2::jsonb, $3, $4)",
            name,
            json.dumps(provider),
            model,
            dimension,
        )
        await conn.execute(f"CREATE TABLE {table} (LIKE {CURRENT} INCLUDING ALL)")
        for index in await conn.fetch(
            "SELECT indexrelid::regclass::text AS name FROM pg_index i "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attname = 'embedding' "
            "WHERE i.indrelid = to_regclass($1) AND (a.attnum = ANY(i.indkey) "
            "OR coalesce(pg_get_expr(i.indexprs, i.indrelid), '') ~ '\\membedding\\M')",
            table,
        ):
            await conn.execute(f"DROP INDEX {index['name']}")
        await conn.execute(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {GUARD}")
        await conn.execute(
            f"ALTER TABLE {table} ALTER COLUMN embedding TYPE vector({int(dimension)})"
        )
        await conn.execute(
            f"ALTER TABLE {table} ADD CONSTRAINT {GUARD} "
            f"CHECK (model = {_literal(model)} AND dimension = {int(dimension)})"
        )
    return Target(name, provider, model, dimension)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


async def check_table(conn: Conn, target: Target) -> None:
    """The target's table exists and holds the target's dimension."""
    typmod = await conn.fetchval(
        "SELECT atttypmod FROM pg_attribute WHERE attrelid = to_regclass($1) "
        "AND attname = 'embedding'",
        target.table,
    )
    if typmod is None:
        raise SchemaError(f"re-embed {target.name!r}: its table `{target.table}` is missing")
    if typmod != target.dimension:
        raise SchemaError(
            f"re-embed {target.name!r}: table `{target.table}` holds {typmod}-d vectors but the "
            f"target is {target.dimension}-d"
        )


def guard(target: Target, model: str, vectors: Sequence[Any]) -> None:
    """Refuse to write vectors of another model or dimension than the target's (the
    table's CHECK and column type refuse them too; this says why before the SQL does)."""
    if model != target.model:
        raise ConfigError(
            f"re-embed {target.name!r} is for model {target.model!r}; the provider is {model!r}"
        )
    for vector in vectors:
        if len(vector) != target.dimension:
            raise ConfigError(
                f"re-embed {target.name!r} is {target.dimension}-d; the provider returned a "
                f"{len(vector)}-d vector"
            )


def _after(s: Shape, first: int, alias: str = "e") -> str:
    """``(key) > (cursor)`` with the cursor's values as parameters from ``$first`` on."""
    cols = ", ".join(f"{alias}.{k}" for k in s.key)
    params = ", ".join(f"${first + i}::{t}" for i, t in enumerate(s.key_types))
    return f"({cols}) > ({params})"


def _on(s: Shape, a: str, b: str) -> str:
    return " AND ".join(f"{a}.{k} = {b}.{k}" for k in s.key)


def _to_embed(s: Shape) -> str:
    """The target's row ``t`` of ``embeddings``' row ``e`` is missing or of other content."""
    return (
        f"(t.{s.key[0]} IS NULL OR t.content_hash <> e.content_hash OR t.text_type <> e.text_type)"
    )


def _to_copy(s: Shape) -> str:
    """The target's row is of another version (a copy of the columns suffices)."""
    differs = [f"t.{c} IS DISTINCT FROM e.{c}" for c in VERSION if c in s.columns]
    return f"({' OR '.join(differs) or 'false'})"


async def read_page(conn: Conn, s: Shape, target: Target, rows: int) -> Page:
    """The page of ``embeddings`` after the target's cursor, sorted into what to do."""
    key = ", ".join(f"e.{k}" for k in s.key)
    where = f"WHERE {_after(s, 3)}" if target.cursor is not None else ""
    sql = f"""
        SELECT {key}, e.namespace, e.id, e.content, e.text_type, e.content_hash,
            e.source_topic, e.source_partition, e.source_offset,
            {_to_embed(s)} AS embed, {_to_copy(s)} AS copy,
            EXISTS (SELECT 1 FROM reembed_refused r WHERE r.target = $1
                    AND r.key = jsonb_build_array({key}) AND r.content_hash = e.content_hash)
                AS refused
        FROM {CURRENT} e LEFT JOIN {target.table} t ON {_on(s, "t", "e")}
        {where}
        ORDER BY {key} LIMIT $2
    """
    found = await conn.fetch(sql, target.name, rows, *(target.cursor or []))
    page = Page(rows=len(found), end=len(found) < rows)
    for r in found:
        k = tuple(r[i] for i in range(len(s.key)))
        page.last = k
        if r["embed"]:
            if r["refused"]:
                continue
            row = Row(
                k,
                r["namespace"],
                r["id"],
                r["content"] or "",
                TextType(r["text_type"]),
                r["content_hash"],
                estimate_tokens(r["content"] or ""),
                (r["source_topic"], r["source_partition"], r["source_offset"]),
            )
            (page.embed if r["content"] else page.no_content).append(row)
        elif r["copy"]:
            page.copy.append((k, r["content_hash"]))
    return page


def _unnest(s: Shape, extra: Sequence[tuple[str, str]]) -> str:
    arrays = [f"${i + 1}::{t}[]" for i, t in enumerate(s.key_types)]
    arrays += [f"${len(s.key) + i + 1}::{t}[]" for i, (_, t) in enumerate(extra)]
    names = [*s.key, *(n for n, _ in extra)]
    return f"unnest({', '.join(arrays)}) AS v({', '.join(names)})"


def _key_columns(s: Shape, keys: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    return [[k[i] for k in keys] for i in range(len(s.key))]


async def write_page(
    conn: Conn,
    s: Shape,
    target: Target,
    page: Page,
    refused: Sequence[Row],
    tokens: int,
) -> int:
    """The page's rows, deletes, refusals and the cursor: one transaction (the caller's).
    Returns the rows written (embedded or copied)."""
    table, first = target.table, len(s.key)
    embedded = [r for r in page.embed if r.vector is not None]
    vectors = [("content_hash", "bytea"), ("embedding", "vector"), ("sparse", "sparsevec")]
    written = 0
    if embedded:
        values = {
            "embedding": "v.embedding",
            "model": f"${first + 4}::text",
            "dimension": f"${first + 5}::int",
            "sparse": "v.sparse",
        }
        select = ", ".join(values.get(c, f"e.{c}") for c in s.columns)
        update = ", ".join(f"{c} = EXCLUDED.{c}" for c in s.columns if c not in s.key)
        status = await conn.execute(
            f"""
            INSERT INTO {table} AS t ({", ".join(s.columns)})
            SELECT {select}
            FROM {_unnest(s, vectors)}
            JOIN {CURRENT} e ON {_on(s, "e", "v")} AND e.content_hash = v.content_hash
            ORDER BY {", ".join(f"e.{k}" for k in s.key)}
            ON CONFLICT ({", ".join(s.key)}) DO UPDATE SET {update}
            """,
            *_key_columns(s, [r.key for r in embedded]),
            [r.content_hash for r in embedded],
            [_vector(r.vector) for r in embedded],
            [r.sparse for r in embedded],
            target.model,
            target.dimension,
        )
        written += _count(status)
    if page.copy:
        columns = [c for c in s.columns if c not in s.key and c not in OWN]
        status = await conn.execute(
            f"""
            UPDATE {table} AS t SET {", ".join(f"{c} = e.{c}" for c in columns)}
            FROM {_unnest(s, [("content_hash", "bytea")])}, {CURRENT} e
            WHERE {_on(s, "t", "v")} AND {_on(s, "e", "v")}
              AND e.content_hash = v.content_hash AND t.content_hash = v.content_hash
            """,
            *_key_columns(s, [k for k, _ in page.copy]),
            [h for _, h in page.copy],
        )
        written += _count(status)
    await _delete_gone(conn, s, target, page)
    if refused:
        await conn.execute(
            f"""
            INSERT INTO reembed_refused (target, key, content_hash)
            SELECT ${first + 2}, jsonb_build_array({", ".join(f"v.{k}" for k in s.key)}),
                v.content_hash
            FROM {_unnest(s, [("content_hash", "bytea")])}
            ON CONFLICT (target, key) DO UPDATE SET content_hash = EXCLUDED.content_hash
            """,
            *_key_columns(s, [r.key for r in refused]),
            [r.content_hash for r in refused],
            target.name,
        )
        # A refused row's old version must not stay in the target either.
        await conn.execute(
            f"DELETE FROM {table} t USING {_unnest(s, [])} WHERE {_on(s, 't', 'v')}",
            *_key_columns(s, [r.key for r in refused]),
        )
    cursor = None if page.end or page.last is None else list(page.last)
    await conn.execute(
        "UPDATE reembed_targets SET cursor = $2::jsonb, passes = passes + $3, job = NULL, "
        "embedded = embedded + $4, copied = copied + $5, tokens = tokens + $6, "
        "updated_at = now() WHERE name = $1",
        target.name,
        None if cursor is None else json.dumps(cursor, default=str),
        int(page.end),
        len(embedded),
        len(page.copy),
        tokens,
    )
    target.cursor, target.job = cursor, None
    target.passes += int(page.end)
    target.embedded += len(embedded)
    target.copied += len(page.copy)
    target.tokens += tokens
    return written


@dataclass
class Dual:
    """A transaction's rows for a target (``reembed.dual_write``): the keys embedded for it
    (with the content hash the vector is of), the keys whose content was unchanged (a new
    version: its columns copied), and every key the transaction touched (deleted from the
    target when ``embeddings`` no longer has it)."""

    embedded: list[tuple[str, str, bytes, Any, Any]] = field(default_factory=list)
    unchanged: list[tuple[str, str]] = field(default_factory=list)
    keys: list[tuple[str, str]] = field(default_factory=list)


def dual_statement(s: Shape, target: Target) -> str:
    """One statement, run after the worker's own in its transaction: what a pass would
    write for these keys (the rows joined with ``embeddings`` on the content hash embedded,
    every other column taken from there), so a pass finds nothing left to do for them.
    Rows are inserted in key order, as a pass's page is, so that the two, inserting the same
    rows at once, take those locks in one order (a deadlock between them stays possible
    through the pass's later statements: Postgres aborts one, the worker retries its write,
    a pass resumes at its next start)."""
    values = {
        "embedding": "v.embedding",
        "model": "$10::text",
        "dimension": "$11::int",
        "sparse": "v.sparse",
    }
    select = ", ".join(values.get(c, f"e.{c}") for c in s.columns)
    update = ", ".join(f"{c} = EXCLUDED.{c}" for c in s.columns if c not in s.key)
    copied = ", ".join(f"{c} = e.{c}" for c in s.columns if c not in s.key and c not in OWN)
    return f"""
        WITH written AS (
            INSERT INTO {target.table} AS t ({", ".join(s.columns)})
            SELECT {select}
            FROM unnest($1::text[], $2::text[], $3::bytea[], $4::vector[], $5::sparsevec[])
                AS v(namespace, id, content_hash, embedding, sparse)
            JOIN {CURRENT} e ON e.namespace = v.namespace AND e.id = v.id
                AND e.content_hash = v.content_hash
            ORDER BY {", ".join(f"e.{k}" for k in s.key)}
            ON CONFLICT ({", ".join(s.key)}) DO UPDATE SET {update}
            RETURNING 1
        ), copied AS (
            UPDATE {target.table} AS t SET {copied}
            FROM unnest($6::text[], $7::text[]) AS u(namespace, id), {CURRENT} e
            WHERE t.namespace = u.namespace AND t.id = u.id AND {_on(s, "e", "t")}
              AND t.content_hash = e.content_hash AND t.text_type = e.text_type
              AND {_to_copy(s)}
        ), gone AS (
            DELETE FROM {target.table} AS t
            USING unnest($8::text[], $9::text[]) AS g(namespace, id)
            WHERE t.namespace = g.namespace AND t.id = g.id
              AND NOT EXISTS (SELECT 1 FROM {CURRENT} e WHERE {_on(s, "e", "t")})
        )
        SELECT count(*) FROM written
    """


async def write_dual(conn: Conn, statement: str, target: Target, rows: Dual) -> int:
    """``dual_statement`` for one transaction's rows; returns the rows written."""
    embedded = rows.embedded
    found = await conn.fetchval(
        statement,
        [r[0] for r in embedded],
        [r[1] for r in embedded],
        [r[2] for r in embedded],
        [_vector(r[3]) for r in embedded],
        [r[4] for r in embedded],
        [k[0] for k in rows.unchanged],
        [k[1] for k in rows.unchanged],
        [k[0] for k in rows.keys],
        [k[1] for k in rows.keys],
        target.model,
        target.dimension,
    )
    return int(found)


async def save_job(conn: Conn, target: Target, job: dict[str, Any] | None) -> None:
    """Record the page's batch job (or its provider's latest answer) at once."""
    await conn.execute(
        "UPDATE reembed_targets SET job = $2::jsonb, updated_at = now() WHERE name = $1",
        target.name,
        None if job is None else json.dumps(job, default=str),
    )
    target.job = job


async def _delete_gone(conn: Conn, s: Shape, target: Target, page: Page) -> None:
    """Target rows in the page's key range whose key ``embeddings`` no longer has."""
    bounds: list[str] = []
    args: list[Any] = []
    if target.cursor is not None:
        bounds.append(_after(s, 1, "t"))
        args += target.cursor
    if not page.end and page.last is not None:
        cols = ", ".join(f"t.{k}" for k in s.key)
        first = len(args) + 1
        params = ", ".join(f"${first + i}::{t}" for i, t in enumerate(s.key_types))
        bounds.append(f"({cols}) <= ({params})")
        args += list(page.last)
    where = " AND ".join(
        [*bounds, f"NOT EXISTS (SELECT 1 FROM {CURRENT} e WHERE {_on(s, 'e', 't')})"]
    )
    await conn.execute(f"DELETE FROM {target.table} t WHERE {where}", *args)


def _vector(vector: Any) -> Vector:
    return Vector(vector)


def _count(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])


@dataclass(frozen=True)
class Counts:
    current: int  # rows of ``embeddings``
    target: int  # rows of the target's table
    pending: int  # rows to embed, copy or delete for the target to equal ``embeddings``
    refused: int  # rows the target's provider refused (left out)


async def counts(conn: Conn, s: Shape, target: Target) -> Counts:
    """What a pass would still do now (a full comparison: a scan of both tables)."""
    key = ", ".join(f"e.{k}" for k in s.key)
    row = await conn.fetchrow(
        f"""
        SELECT (SELECT count(*) FROM {CURRENT}) AS current,
               (SELECT count(*) FROM {target.table}) AS target,
               (SELECT count(*) FROM {CURRENT} e LEFT JOIN {target.table} t
                  ON {_on(s, "t", "e")}
                WHERE ({_to_embed(s)} OR {_to_copy(s)})
                  AND NOT EXISTS (SELECT 1 FROM reembed_refused r WHERE r.target = $1
                      AND r.key = jsonb_build_array({key}) AND r.content_hash = e.content_hash))
               + (SELECT count(*) FROM {target.table} t
                  WHERE NOT EXISTS (SELECT 1 FROM {CURRENT} e WHERE {_on(s, "e", "t")}))
               AS pending,
               (SELECT count(*) FROM reembed_refused WHERE target = $1) AS refused
        """,
        target.name,
    )
    assert row is not None
    return Counts(row["current"], row["target"], row["pending"], row["refused"])


async def lock_current(conn: Conn, timeout_s: float) -> None:
    """Writers wait (search goes on) until the transaction ends: the switch's final pass
    sees ``embeddings`` still."""
    await conn.execute(f"SET LOCAL lock_timeout = '{int(timeout_s * 1000)}ms'")
    await conn.execute(f"LOCK TABLE {CURRENT} IN EXCLUSIVE MODE")


async def swap(conn: Conn, target: Target, names: dict[str, str] | None = None) -> None:
    """Inside the switch's transaction: the target's table becomes ``embeddings``, and the
    current one ``embeddings_before_<name>``, each index renamed with its table (the target's
    indexes take the names of the current table's matching ones, so ``index`` finds them;
    ``names``: the target's indexes whose new name is given, e.g. its HNSW index)."""
    names = names or {}
    retired = retired_of(target.name)
    old = await _indexes(conn, CURRENT)
    new = await _indexes(conn, target.table)
    await conn.execute(f"ALTER TABLE {CURRENT} RENAME TO {retired}")
    await conn.execute(f"ALTER TABLE {target.table} RENAME TO {CURRENT}")
    renamed: dict[str, str] = {}
    for shape_of, name in old.items():
        moved = f"{name}_before_{target.name}"[:63]
        await conn.execute(f"ALTER INDEX {name} RENAME TO {moved}")
        renamed[shape_of] = name
    for shape_of, name in new.items():
        if name in names:
            await conn.execute(f"ALTER INDEX {name} RENAME TO {names[name]}")
        elif shape_of in renamed and renamed[shape_of] not in names.values():
            await conn.execute(f"ALTER INDEX {name} RENAME TO {renamed[shape_of]}")
    await _retype_derived(conn, target)
    await conn.execute(
        "UPDATE reembed_targets SET state = 'switched', switched_at = now(), updated_at = now() "
        "WHERE name = $1",
        target.name,
    )
    target.state = "switched"


async def _retype_derived(conn: Conn, target: Target) -> None:
    """The tables of ``DERIVED`` of another dimension: their rows (of the old model, whose
    vectors cannot be kept in the new type) copied aside, then the column retyped."""
    for table, column in DERIVED:
        typmod = await conn.fetchval(
            "SELECT atttypmod FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = $2",
            table,
            column,
        )
        if typmod is None or typmod == target.dimension:
            continue
        await conn.execute(f"CREATE TABLE {table}_before_{target.name} AS TABLE {table}")
        await conn.execute(f"TRUNCATE {table}")
        await conn.execute(
            f"ALTER TABLE {table} ALTER COLUMN {column} TYPE vector({int(target.dimension)})"
        )


@dataclass
class Decision:
    """A moderation decision learned as an example (``label_vectors`` of kind ``decision``,
    ``worker/analysis/decisions.py``), to carry over to the target's model."""

    namespace: str
    decided_id: str
    label: str
    text_hash: bytes
    content: str
    partition: int | None
    offset: int | None
    vector: Any = None


async def decisions_of(conn: Conn, model: str) -> list[Decision]:
    """The decisions of ``model`` (not the withdrawn), with their writers held off until the
    transaction ends (none is learned between this read and the switch)."""
    if await conn.fetchval("SELECT to_regclass('decision_state')") is None:
        return []  # before migration 0004
    await conn.execute("LOCK TABLE label_vectors IN SHARE ROW EXCLUSIVE MODE")
    rows = await conn.fetch(
        "SELECT namespace, decided_id, label, text_hash, content, decision_partition, "
        "decision_offset FROM label_vectors "
        "WHERE kind = 'decision' AND model = $1 AND NOT withdrawn",
        model,
    )
    return [Decision(*r) for r in rows]


async def stored_vectors(conn: Conn, decisions: Sequence[Decision]) -> None:
    """Each decision's vector from its event's row in ``embeddings`` (the target after the
    swap), as the decisions module takes it, when the row holds the same content."""
    if not decisions:
        return
    rows = await conn.fetch(
        "SELECT namespace, id, content, embedding FROM embeddings "
        "WHERE namespace = ANY($1::text[]) AND id = ANY($2::text[])",
        sorted({d.namespace for d in decisions}),
        [d.decided_id for d in decisions],
    )
    found = {(r["namespace"], r["id"]): r for r in rows}
    for d in decisions:
        row = found.get((d.namespace, d.decided_id))
        if row is not None and row["content"] == d.content:
            d.vector = row["embedding"]


async def add_decisions(conn: Conn, target: Target, decisions: Sequence[Decision]) -> None:
    """The decisions as the target model's examples, and its namespaces' decision versions
    raised (replicas running the target load them)."""
    done = [d for d in decisions if d.vector is not None]
    if not done:
        return
    await conn.execute(
        """
        WITH added AS (
            INSERT INTO label_vectors (namespace, model, kind, label, text_hash, content,
                embedding, decided_id, decision_partition, decision_offset)
            SELECT s.namespace, $1, 'decision', s.label, s.text_hash, s.content, s.embedding,
                s.decided_id, s.decision_partition, s.decision_offset
            FROM unnest($2::text[], $3::text[], $4::text[], $5::bytea[], $6::text[],
                $7::vector[], $8::int[], $9::bigint[])
            AS s(namespace, decided_id, label, text_hash, content, embedding,
                 decision_partition, decision_offset)
            ON CONFLICT (namespace, model, decided_id) WHERE kind = 'decision' DO NOTHING
            RETURNING namespace
        )
        INSERT INTO decision_state AS d (namespace, model, version)
        SELECT namespace, $1, 1 FROM added GROUP BY namespace
        ON CONFLICT (namespace, model) DO UPDATE SET version = d.version + 1, updated_at = now()
        """,
        target.model,
        [d.namespace for d in done],
        [d.decided_id for d in done],
        [d.label for d in done],
        [d.text_hash for d in done],
        [d.content for d in done],
        [d.vector if isinstance(d.vector, Vector) else _vector(d.vector) for d in done],
        [d.partition for d in done],
        [d.offset for d in done],
    )


async def _indexes(conn: Conn, table: str) -> dict[str, str]:
    """Index names by their definition without their own and their table's name."""
    rows = await conn.fetch(
        "SELECT indexrelid::regclass::text AS name, regexp_replace(pg_get_indexdef(indexrelid),"
        " '^CREATE (UNIQUE )?INDEX \\S+ ON \\S+', 'CREATE \\1INDEX ON') AS shape "
        "FROM pg_index WHERE indrelid = to_regclass($1)",
        table,
    )
    return {r["shape"]: r["name"] for r in rows}


async def drop(conn: Conn, target: Target) -> str:
    """The table before the switch, or (not switched) the abandoned target's own table."""
    table = retired_of(target.name) if target.state == "switched" else target.table
    async with conn.transaction():
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        for derived, _ in DERIVED:
            await conn.execute(f"DROP TABLE IF EXISTS {derived}_before_{target.name}")
        await conn.execute(
            "UPDATE reembed_targets SET state = 'dropped', cursor = NULL, updated_at = now() "
            "WHERE name = $1",
            target.name,
        )
        await conn.execute("DELETE FROM reembed_refused WHERE target = $1", target.name)
    target.state = "dropped"
    return table
