"""Search speed (issue 17): recall@10 of the HNSW index against exact search, and the latency
of the project's search path beside the same SQL sent directly through asyncpg.

Rows: ``--rows`` distinct real texts, tweets of TweetEval (``benchmarks.search_rows`` says
where from: repository, commit, paths), stored with the local model's vectors
(``use-multilingual-v3``, 512-d) as documents. Queries: ``--queries`` further tweets of the
same pool, none among the rows, embedded as queries beforehand, so the timed path is search
without the embedding (``Cached`` hands the vector over). Both are cached outside the
repository (``python -m benchmarks.search_rows`` embeds them ahead, shard by shard).

The database is migrated with ``search.text_search_config`` = ``--text-search-config``
(``simple``, the default, or e.g. ``english``), fixed for its lexical search as the worker's
migration fixes it. The HNSW index is built as ``embedding-worker index create`` builds it,
at its defaults (m 16, ef_construction 64) unless ``--m`` and ``--ef-construction`` say
otherwise. Recall@10: ``worker.read.search.search`` in dense mode (the index at the
``hnsw.ef_search`` it sets, ``worker.read.index.EF_SEARCH`` for k = 10) against the exact
top 10 of the same query (``SET enable_indexscan = off``); then the same SQL at other
``hnsw.ef_search`` (``EF_SEARCH``). ``--recall-only`` stops there.

Latency, per query, alternating which side goes first: ``worker.read.search.search`` in each
mode against the equivalent SQL of docs/retrieval.md on a connection with the same
settings made once (``hnsw.ef_search``, iterative scan, custom plans): dense over every
query; lexical and hybrid over the first ``--lexical-queries``, after ``index create
--lexical`` (stored words, GIN index), and with ``--computed-words`` also before it (words
computed per row: seconds per query at 100,000 rows). Each of ``--repeat`` passes yields
p50 and p99 per side; the medians over passes are reported, with the load average.

    python -m benchmarks.search_speed [--rows 100000] [--queries 200] [--lexical-queries 50]
        [--repeat 3] [--text-search-config simple] [--computed-words] [--dsn DSN]

Without ``--dsn`` an embedded Postgres is started in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
from pgvector.asyncpg import register_vector

from benchmarks import search_rows
from evaluation.postgres import with_postgres
from evaluation.retrieval import DIMENSION, MODEL, NAMESPACE, Cached, fill
from worker.events import TextType
from worker.read import index
from worker.read.search import CANDIDATES, Mode, search
from worker.sinks.migrate import migrate

K = 10
# recall@10 also at these hnsw.ef_search (search sets index.EF_SEARCH, skipped here)
EF_SEARCH = tuple(ef for ef in (40, 100, 200, 400) if ef != index.EF_SEARCH)

# The SQL of docs/retrieval.md, as an application would send it (lexical: the query text is
# $1 here, as it has no vector to pass).
DENSE = """
SELECT namespace, id, content, metadata, 1 - (embedding <=> $1) AS score
FROM embeddings
WHERE model = $2 AND ($3::text IS NULL OR namespace = $3)
  AND ($4::jsonb IS NULL OR metadata @> $4::jsonb)
ORDER BY embedding <=> $1
LIMIT 10
"""
LEXICAL = """
SELECT namespace, id, content, metadata, ts_rank({words}, q, 1) AS score
FROM embeddings, embeddings_lexical_query($1) AS q
WHERE numnode(q) > 0 AND {words} @@ q
  AND model = $2 AND ($3::text IS NULL OR namespace = $3)
  AND ($4::jsonb IS NULL OR metadata @> $4::jsonb)
ORDER BY score DESC, namespace, id
LIMIT 10
"""
HYBRID = """
WITH f AS NOT MATERIALIZED (
    SELECT * FROM embeddings
    WHERE model = $2 AND ($3::text IS NULL OR namespace = $3)
      AND ($4::jsonb IS NULL OR metadata @> $4::jsonb)
), dense AS (
    SELECT namespace, id, 0 AS list, row_number() OVER (ORDER BY embedding <=> $1) AS rank
    FROM f ORDER BY embedding <=> $1 LIMIT 100
), lexical AS (
    SELECT namespace, id, 1 AS list,
           row_number() OVER (ORDER BY score DESC, namespace, id) AS rank
    FROM (
        SELECT namespace, id, ts_rank({words}, q, 1) AS score
        FROM f, embeddings_lexical_query($5) AS q
        WHERE numnode(q) > 0 AND {words} @@ q
        ORDER BY score DESC, namespace, id LIMIT 100
    ) AS best
)
SELECT namespace, id, sum(1.0 / (60 + rank)) AS score
FROM (SELECT * FROM dense UNION ALL SELECT * FROM lexical) AS both_lists
GROUP BY namespace, id
ORDER BY score DESC, min(ARRAY[list, rank])
LIMIT 10
"""


async def session(dsn: str, ef_search: int) -> asyncpg.Connection:
    """A connection set once as ``worker.read.index.search_order`` sets each transaction."""
    conn = await asyncpg.connect(dsn)
    await register_vector(conn)
    await conn.execute(f"SET hnsw.ef_search = {int(ef_search)}")
    await conn.execute("SET hnsw.iterative_scan = strict_order")  # pgvector 0.8+
    await conn.execute("SET plan_cache_mode = force_custom_plan")  # else no index by run 6
    return conn


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


Run = Callable[[int], Awaitable[Any]]


async def timed(pairs: dict[str, tuple[Run, Run]], queries: int, repeat: int) -> dict[str, Any]:
    """p50 and p99 (ms) of each side of each pair, medians over `repeat` passes, and the
    project/direct ratios (medians of each pass's ratio)."""
    for project, direct in pairs.values():  # warm the caches and the plans
        for i in range(min(queries, 5)):
            await project(i)
            await direct(i)
    passes: dict[str, list[dict[str, float]]] = {name: [] for name in pairs}
    for r in range(repeat):
        for name, (project, direct) in pairs.items():
            took: dict[str, list[float]] = {"project": [], "direct": []}
            for i in range(queries):
                sides = [("project", project), ("direct", direct)]
                for side, run in sides if (i + r) % 2 == 0 else sides[::-1]:
                    began = time.perf_counter()
                    await run(i)
                    took[side].append(1000 * (time.perf_counter() - began))
            one = {
                f"{side}_{label}": percentile(took[side], q)
                for side in took
                for label, q in (("p50", 50), ("p99", 99))
            }
            one["ratio_p50"] = one["project_p50"] / one["direct_p50"]
            one["ratio_p99"] = one["project_p99"] / one["direct_p99"]
            one["load_1m"] = os.getloadavg()[0]  # the machine is shared: say how busy it was
            passes[name].append(one)
            print(f"pass {r} {name}: " + json.dumps({k: round(v, 2) for k, v in one.items()}))
    return {
        name: {key: round(statistics.median(p[key] for p in got), 3) for key in got[0]}
        for name, got in passes.items()
    }


async def run(args: argparse.Namespace, admin_dsn: str) -> dict[str, Any]:
    texts = search_rows.load(args.queries, args.rows, args.mirror)
    asked = texts.queries
    queries = await search_rows.embed(asked, TextType.QUERY)
    vectors = await search_rows.embed(texts.rows, TextType.DOCUMENT)
    embedder = Cached(dict(zip(asked, queries, strict=True)))
    lexical_queries = min(args.lexical_queries, len(asked))
    database = f"search_speed_{args.text_search_config}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'DROP DATABASE IF EXISTS "{database}"')
    await admin.execute(f'CREATE DATABASE "{database}"')
    await admin.close()
    dsn = admin_dsn.replace("/postgres?", f"/{database}?", 1)
    conn = await asyncpg.connect(dsn)
    await migrate(conn, DIMENSION, text_search_config=args.text_search_config)
    await register_vector(conn)
    began = time.perf_counter()
    await fill(conn, [(str(i), t) for i, t in enumerate(texts.rows)], vectors)
    await conn.execute("VACUUM ANALYZE embeddings")
    print(f"{len(vectors)} rows stored in {time.perf_counter() - began:.1f} s", flush=True)
    began = time.perf_counter()
    built, _ = await index.create(
        conn, DIMENSION, args.m, args.ef_construction, args.maintenance_work_mem
    )
    build_s = time.perf_counter() - began
    print(f"HNSW: {build_s:.1f} s, {built.size_bytes >> 20} MiB", flush=True)
    exact = await asyncpg.connect(dsn)
    await register_vector(exact)
    await exact.execute("SET enable_indexscan = off; SET plan_cache_mode = force_custom_plan")
    await exact.execute("SET hnsw.iterative_scan = strict_order")
    dense_conn = await session(dsn, index.EF_SEARCH)  # what search_order sets for k = 10
    hybrid_conn = await session(dsn, CANDIDATES)  # ... and for the hybrid's 100 candidates
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
        "postgres": await conn.fetchval("SHOW server_version"),
        "pgvector": await conn.fetchval(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
        ),
        "rows": len(vectors),
        "distinct_texts": texts.pool,
        "queries": len(asked),
        "lexical_queries": lexical_queries,
        "text_search_config": args.text_search_config,
        "repeat": args.repeat,
        "hnsw_m": args.m,
        "hnsw_ef_construction": args.ef_construction,
        "hnsw_build_s": round(build_s, 1),
        "hnsw_mib": built.size_bytes >> 20,
        "load_1m_at_start": os.getloadavg()[0],
    }
    try:
        truths, recall, scores = [], [], []
        for text, q in zip(asked, queries, strict=True):
            top = await exact.fetch(DENSE, q, MODEL, NAMESPACE, None)
            got = await search(conn, embedder, text, K, NAMESPACE, mode=Mode.DENSE)
            truths.append({r["id"] for r in top})
            scores.append([r["score"] for r in top])
            recall.append(len(truths[-1] & {h.id for h in got}) / K)
        result["recall@10"] = {f"{index.EF_SEARCH} (search's)": round(float(np.mean(recall)), 4)}
        result["queries_below_0.9"] = sum(r < 0.9 for r in recall)
        # How far apart the true neighbours are: the closer, the harder for HNSW to order.
        result["exact_similarity_1st_10th"] = np.round(np.mean(scores, axis=0)[[0, -1]], 3).tolist()
        result["direct_p50_ms"] = {}  # what the higher settings cost (one pass, no warm-up)
        for ef_search in EF_SEARCH:  # the same SQL, other settings
            await exact.execute(f"RESET enable_indexscan; SET hnsw.ef_search = {ef_search}")
            found, took = [], []
            for t, q in zip(truths, queries, strict=True):
                began = time.perf_counter()
                top = await exact.fetch(DENSE, q, MODEL, NAMESPACE, None)
                took.append(1000 * (time.perf_counter() - began))
                found.append(len(t & {r["id"] for r in top}))
            result["recall@10"][str(ef_search)] = round(float(np.mean(found)) / K, 4)
            result["direct_p50_ms"][str(ef_search)] = round(percentile(took, 50), 2)
        print(json.dumps(result), flush=True)
        if args.recall_only:
            return result

        def project(mode: Mode) -> Run:
            return lambda i: search(conn, embedder, asked[i], K, NAMESPACE, mode=mode)

        def direct(c: asyncpg.Connection, sql: str, mode: Mode) -> Run:
            def args(i: int) -> tuple[Any, ...]:
                if mode is Mode.LEXICAL:
                    return asked[i], MODEL, NAMESPACE, None
                text = (asked[i],) if mode is Mode.HYBRID else ()
                return queries[i], MODEL, NAMESPACE, None, *text

            return lambda i: c.fetch(sql, *args(i))

        def pairs(words: str, label: str) -> dict[str, tuple[Run, Run]]:
            """The direct SQL in the form the project's path picks (computed or stored words)."""
            lexical_sql = LEXICAL.format(words=words)
            hybrid_sql = HYBRID.format(words=words)
            return {
                f"lexical ({label})": (
                    project(Mode.LEXICAL),
                    direct(dense_conn, lexical_sql, Mode.LEXICAL),
                ),
                f"hybrid ({label})": (
                    project(Mode.HYBRID),
                    direct(hybrid_conn, hybrid_sql, Mode.HYBRID),
                ),
            }

        dense = {"dense": (project(Mode.DENSE), direct(dense_conn, DENSE, Mode.DENSE))}
        latency = await timed(dense, len(asked), args.repeat)
        if args.computed_words:
            computed = pairs("embeddings_lexical(content)", "words computed")
            latency |= await timed(computed, lexical_queries, args.repeat)
        await index.create_lexical(conn)
        await conn.execute("ANALYZE embeddings")
        stored = pairs(index.LEXICAL_COLUMN, "index create --lexical")
        latency |= await timed(stored, lexical_queries, args.repeat)
        result["latency_ms"] = latency
        result["load_1m_at_end"] = os.getloadavg()[0]
    finally:
        for c in (conn, exact, dense_conn, hybrid_conn):
            await c.close()
    print(json.dumps(result, indent=1), flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument(
        "--lexical-queries", type=int, default=50, help="timed in lexical and hybrid mode"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--text-search-config", default="simple", help="as the setting")
    parser.add_argument(
        "--computed-words", action="store_true", help="also time lexical before its index"
    )
    parser.add_argument("--recall-only", action="store_true", help="skip the latencies")
    parser.add_argument("--m", type=int, default=16, help="HNSW build (index create's default)")
    parser.add_argument("--ef-construction", type=int, default=64, help="likewise")
    parser.add_argument("--maintenance-work-mem", default="1GB", help="for the HNSW build")
    parser.add_argument("--mirror", type=Path, help=f"a git copy of {search_rows.REPO}")
    parser.add_argument("--dsn", help="a Postgres superuser DSN ending in /postgres?...")
    args = parser.parse_args(argv)
    with_postgres(lambda dsn: run(args, dsn), args.dsn)


if __name__ == "__main__":
    main()
