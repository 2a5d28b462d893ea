"""What the lexical GIN index costs the writer (issue 17): ``worker.sinks.postgres.write`` with and
without ``index create --lexical`` (the GIN index on ``embeddings_lexical(content)``).

AG News descriptions (real text: the tsvector's cost grows with it) with random unit 512-d
vectors (the vector's cost is the same everywhere), written in transactions of
``WRITE_ROWS`` rows as the worker commits them: first as new keys (the direct COPY path),
then again with newer versions and changed text (the guarded upsert path). Two databases
(fully migrated, without and with the index) are written in turn, ``--repeat`` times each;
the median seconds per pass are reported.

    python -m benchmarks.tsvector_cost [--rows 5000] [--repeat 3] [--dsn DSN]

Without ``--dsn`` an embedded Postgres is started in a temporary directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import numpy as np
from pgvector.asyncpg import register_vector

from evaluation.offline import SHARED
from evaluation.postgres import with_postgres
from worker.model import Change, Record
from worker.read import index
from worker.sinks import postgres as store
from worker.sinks.migrate import migrate

WRITE_ROWS = 500  # batch.write_max_rows
DIMENSION = 512


def texts(path: Path, rows: int) -> list[str]:
    with path.open(encoding="utf-8") as lines:
        return [
            json.loads(line)["description"] for _, line in zip(range(rows), lines, strict=False)
        ]


def changes(texts: list[str], vectors: np.ndarray, offset: int, suffix: str) -> list[Change]:
    when = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=offset)
    out = []
    for i, (text, vector) in enumerate(zip(texts, vectors, strict=True)):
        content = text + suffix
        out.append(
            Change(
                record=Record("t", 0, offset + i, None, None),
                namespace="ns",
                id=f"doc-{i}",
                op="upsert",
                event_time=when,
                text=content,
                content_hash=hashlib.sha256(content.encode()).digest(),
                vector=vector,
            )
        )
    return out


async def write_pass(conn: asyncpg.Connection, batch: list[Change]) -> float:
    began = time.perf_counter()
    for start in range(0, len(batch), WRITE_ROWS):
        chunk = batch[start : start + WRITE_ROWS]
        await store.write(conn, chunk, {("t", 0): chunk[-1].offset + 1}, "bench", "m", DIMENSION)
    return time.perf_counter() - began


async def run(args: argparse.Namespace, admin_dsn: str) -> None:
    rows = texts(SHARED / "ag_news" / "ag_news_test.jsonl", args.rows)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(rows), DIMENSION)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    admin = await asyncpg.connect(admin_dsn)
    times: dict[str, dict[str, list[float]]] = {}
    try:
        for repeat in range(args.repeat):
            for name in ("without", "with"):
                db = f"tsvector_cost_{name}"
                await admin.execute(f'DROP DATABASE IF EXISTS "{db}"')
                await admin.execute(f'CREATE DATABASE "{db}"')
                conn = await asyncpg.connect(admin_dsn.replace("/postgres?", f"/{db}?", 1))
                try:
                    await migrate(conn, DIMENSION)
                    if name == "with":
                        await index.create_lexical(conn)
                    await register_vector(conn)
                    new = await write_pass(conn, changes(rows, vectors, 0, ""))
                    changed = await write_pass(
                        conn, changes(rows, vectors, len(rows), " (updated)")
                    )
                finally:
                    await conn.close()
                per = times.setdefault(name, {"new": [], "update": []})
                per["new"].append(new)
                per["update"].append(changed)
                print(
                    f"repeat {repeat} {name}: new {new:.2f} s, update {changed:.2f} s", flush=True
                )
    finally:
        await admin.close()
    for path_name in ("new", "update"):
        base = statistics.median(times["without"][path_name])
        t = statistics.median(times["with"][path_name])
        print(
            f"{path_name}: {len(rows)} rows, without the lexical index {base:.2f} s "
            f"({len(rows) / base:,.0f} rows/s), with it {t:.2f} s ({len(rows) / t:,.0f} rows/s, "
            f"{100 * (t - base) / base:+.0f} %)"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dsn", help="a Postgres superuser DSN ending in /postgres?...")
    args = parser.parse_args(argv)
    with_postgres(lambda dsn: run(args, dsn), args.dsn)


if __name__ == "__main__":
    main()
