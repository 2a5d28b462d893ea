"""Search speed (issue 17): recall@10 of the HNSW index against exact search, and the latency
of the project's search path beside the same SQL sent directly through asyncpg.

Rows: the local model's vectors (``use-multilingual-v3``, 512-d) of the AG News test
descriptions (``evaluation.retrieval.articles``: 7,563 distinct ones), cached outside the
repository by ``evaluation.baselines.VectorCache``, repeated up to ``--rows``: copy c > 0 of a
description's vector is that vector plus Gaussian noise of expected norm ``--noise``,
renormalised (copy 0 is the vector itself); every copy's content is the description. Real
texts for 100,000 rows are not at hand (the shared data hold AG News's 7,600-row test split,
and the local model embeds ~90 texts/s here). Queries: the titles' vectors (query side),
computed beforehand, so the timed path is search without the embedding (``Cached`` hands
the vector over).

The HNSW index is built as ``embedding-worker index create`` builds it at its defaults
(m 16, ef_construction 64). Recall@10: ``worker.read.search.search`` in dense mode (the index at
the ``hnsw.ef_search`` it sets, 40 for k = 10) against the exact top 10 of the same query
(``SET enable_indexscan = off``); then the same SQL at higher ``hnsw.ef_search``
(``EF_SEARCH``). ``--recall-only`` stops there.

Latency, per query, alternating which side goes first: ``worker.read.search.search`` in each
mode against the equivalent SQL of docs/retrieval.md on a connection with the same
settings made once (``hnsw.ef_search``, iterative scan, custom plans): dense,
lexical and hybrid, the last two without and then with the lexical GIN index, over the
first ``--lexical-queries`` queries only (each takes of the order of a second at 100,000
rows). Each of ``--repeat`` passes yields p50 and p99 per side; the medians over passes are
reported.

    python -m benchmarks.search_speed [--rows 100000] [--queries 200] [--lexical-queries 20]
        [--repeat 3] [--dsn DSN]

Without ``--dsn`` an embedded Postgres is started in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import numpy as np
from pgvector.asyncpg import register_vector

from evaluation.baselines import VectorCache, normalise
from evaluation.datasets import data_dir
from evaluation.offline import SHARED
from evaluation.postgres import with_postgres
from evaluation.retrieval import DIMENSION, MODEL, NAMESPACE, Article, Cached, articles, fill
from worker.events import TextType
from worker.read import index
from worker.read.search import CANDIDATES, Mode, search
from worker.sinks.migrate import migrate

K = 10
EF_SEARCH = (100, 200, 400)  # recall@10 also at these hnsw.ef_search (search sets 40)
DATABASE = "search_speed"

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
           row_number() OVER (ORDER BY ts_rank({words}, q, 1) DESC, namespace, id) AS rank
    FROM f, embeddings_lexical_query($5) AS q
    WHERE numnode(q) > 0 AND {words} @@ q
    ORDER BY rank LIMIT 100
)
SELECT namespace, id, sum(1.0 / (60 + rank)) AS score
FROM (SELECT * FROM dense UNION ALL SELECT * FROM lexical) AS both_lists
GROUP BY namespace, id
ORDER BY score DESC, min(ARRAY[list, rank])
LIMIT 10
"""


def rows(descriptions: np.ndarray, count: int, noise: float, seed: int) -> np.ndarray:
    """`count` unit vectors: row i is description i % n, perturbed unless it is copy 0."""
    rng = np.random.default_rng(seed)
    base = np.asarray(descriptions, dtype=np.float32)
    source = np.arange(count) % len(base)
    out = base[source].copy()
    perturbed = np.arange(count) >= len(base)
    jitter = rng.normal(size=(int(perturbed.sum()), base.shape[1])).astype(np.float32)
    out[perturbed] += jitter * (noise / np.sqrt(base.shape[1]))
    return np.asarray(normalise(out), dtype=np.float32)


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
            passes[name].append(one)
            print(f"pass {r} {name}: " + json.dumps({k: round(v, 2) for k, v in one.items()}))
    return {
        name: {key: round(statistics.median(p[key] for p in got), 3) for key in got[0]}
        for name, got in passes.items()
    }


async def run(args: argparse.Namespace, admin_dsn: str) -> dict[str, Any]:
    kept, _ = articles(SHARED / "ag_news" / "ag_news_test.jsonl", 10_000)
    cache = VectorCache(data_dir() / "vectors", MODEL)
    documents = await cache.embed([a.description for a in kept], TextType.DOCUMENT)
    asked: list[Article] = kept[: args.queries]
    queries = await cache.embed([a.title for a in asked], TextType.QUERY)
    embedder = Cached({a.title: q for a, q in zip(asked, queries, strict=True)})
    vectors = rows(documents, args.rows, args.noise, args.seed)
    lexical_queries = min(args.lexical_queries, len(asked))
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}"')
    await admin.execute(f'CREATE DATABASE "{DATABASE}"')
    await admin.close()
    dsn = admin_dsn.replace("/postgres?", f"/{DATABASE}?", 1)
    conn = await asyncpg.connect(dsn)
    await migrate(conn, DIMENSION)
    await register_vector(conn)
    began = time.perf_counter()
    texts = [a.description for a in kept]
    await fill(conn, [(str(i), texts[i % len(texts)]) for i in range(len(vectors))], vectors)
    await conn.execute("VACUUM ANALYZE embeddings")
    print(f"{len(vectors)} rows stored in {time.perf_counter() - began:.1f} s", flush=True)
    began = time.perf_counter()
    built, _ = await index.create(conn, DIMENSION, 16, 64, args.maintenance_work_mem)
    build_s = time.perf_counter() - began
    print(f"HNSW (m 16, ef_construction 64): {build_s:.1f} s, {built.size_bytes >> 20} MiB")
    exact = await asyncpg.connect(dsn)
    await register_vector(exact)
    await exact.execute("SET enable_indexscan = off; SET plan_cache_mode = force_custom_plan")
    await exact.execute("SET hnsw.iterative_scan = strict_order")
    dense_conn = await session(dsn, 40)  # what search_order sets for k = 10
    hybrid_conn = await session(dsn, CANDIDATES)  # ... and for the hybrid's 100 candidates
    result: dict[str, Any] = {
        "rows": len(vectors),
        "descriptions": len(kept),
        "queries": len(asked),
        "lexical_queries": lexical_queries,
        "noise": args.noise,
        "repeat": args.repeat,
        "hnsw_build_s": round(build_s, 1),
        "hnsw_mib": built.size_bytes >> 20,
    }
    try:
        truths, recall = [], []
        for a, q in zip(asked, queries, strict=True):
            truth = {r["id"] for r in await exact.fetch(DENSE, q, MODEL, NAMESPACE, None)}
            got = await search(conn, embedder, a.title, K, NAMESPACE, mode=Mode.DENSE)
            truths.append(truth)
            recall.append(len(truth & {h.id for h in got}) / K)
        result["recall@10"] = {"40 (search's)": round(float(np.mean(recall)), 4)}
        for ef_search in EF_SEARCH:  # the same SQL, higher settings
            await exact.execute(f"RESET enable_indexscan; SET hnsw.ef_search = {ef_search}")
            found = [
                len(t & {r["id"] for r in await exact.fetch(DENSE, q, MODEL, NAMESPACE, None)})
                for t, q in zip(truths, queries, strict=True)
            ]
            result["recall@10"][str(ef_search)] = round(float(np.mean(found)) / K, 4)
        print(json.dumps(result), flush=True)
        if args.recall_only:
            return result

        def project(mode: Mode) -> Run:
            return lambda i: search(conn, embedder, asked[i].title, K, NAMESPACE, mode=mode)

        def direct(c: asyncpg.Connection, sql: str, mode: Mode) -> Run:
            def args(i: int) -> tuple[Any, ...]:
                if mode is Mode.LEXICAL:
                    return asked[i].title, MODEL, NAMESPACE, None
                text = (asked[i].title,) if mode is Mode.HYBRID else ()
                return queries[i], MODEL, NAMESPACE, None, *text

            return lambda i: c.fetch(sql, *args(i))

        def pairs(words: str) -> dict[str, tuple[Run, Run]]:
            """The direct SQL in the form the project's path picks (computed or stored words)."""
            lexical_sql = LEXICAL.format(words=words)
            hybrid_sql = HYBRID.format(words=words)
            return {
                "lexical": (project(Mode.LEXICAL), direct(dense_conn, lexical_sql, Mode.LEXICAL)),
                "hybrid": (project(Mode.HYBRID), direct(hybrid_conn, hybrid_sql, Mode.HYBRID)),
            }

        latency = await timed(
            {
                "dense": (project(Mode.DENSE), direct(dense_conn, DENSE, Mode.DENSE)),
            },
            len(asked),
            args.repeat,
        )
        computed = pairs("embeddings_lexical(content)")
        latency |= await timed(
            {f"{n} (words computed)": p for n, p in computed.items()},
            lexical_queries,
            args.repeat,
        )
        await index.create_lexical(conn)
        await conn.execute("ANALYZE embeddings")
        stored = pairs(index.LEXICAL_COLUMN)
        latency |= await timed(
            {f"{n} (index create --lexical)": p for n, p in stored.items()},
            lexical_queries,
            args.repeat,
        )
        result["latency_ms"] = latency
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
        "--lexical-queries", type=int, default=20, help="timed in lexical and hybrid mode"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--noise", type=float, default=0.3, help="expected norm of the jitter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recall-only", action="store_true", help="skip the latencies")
    parser.add_argument("--maintenance-work-mem", default="1GB", help="for the HNSW build")
    parser.add_argument("--dsn", help="a Postgres superuser DSN ending in /postgres?...")
    args = parser.parse_args(argv)
    with_postgres(lambda dsn: run(args, dsn), args.dsn)


if __name__ == "__main__":
    main()
