"""Retrieval quality of the search modes (issue 17): AG News as known-item retrieval.

Each article's title is the query and its own description the one relevant document, over
the first ``--rows`` articles of the shared test split (rows whose title or description
repeats another's are left out: their answer would be ambiguous). The descriptions are
stored as rows (``content``) through migration 0006 with each text search configuration, and
every title is searched with ``worker.read.search.search`` in each mode: MRR@10 and Recall@10.
Vectors come from the local model through ``evaluation.baselines.VectorCache`` (cached
outside the repository); the data set is only read.

    python -m evaluation.retrieval [--rows 5000] [--config simple --config english] [--dsn DSN]
        [--lexical-index] [--sparse] [--queries N]

Without ``--dsn`` an embedded Postgres is started in a temporary directory. Dense search is
exact (no HNSW index), so its figures are the model's, not the index's; lexical search scans
unless ``--lexical-index`` builds the GIN index (same answers, other times). ``--queries``
measures the first N titles only, for timing.

``--sparse`` also stores a sparse vector per row and measures sparse search and hybrid of dense
and sparse. No real sparse model is at hand: the vectors are the fake provider's (XLM-R pieces
weighted by their rarity under the unigram model and their count, fakeapi/vocabulary.py), so
those figures measure the search path with a plausible lexical weighting, not DashScope's
sparse output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
from pgvector.asyncpg import register_vector

from evaluation.baselines import VectorCache
from evaluation.datasets import data_dir
from evaluation.offline import SHARED
from evaluation.postgres import with_postgres
from fakeapi.vocabulary import sparse_vector
from worker.embedding.providers import dashscope
from worker.embedding.providers.base import Embedder, Embeddings
from worker.events import TextType
from worker.read import index
from worker.read.search import CANDIDATES, RRF_K, Mode, search
from worker.sinks.migrate import migrate

MODEL = "use-multilingual-v3"
DIMENSION = 512
NAMESPACE = "ag_news"


@dataclass(frozen=True)
class Article:
    title: str
    description: str


def articles(path: Path, rows: int) -> tuple[list[Article], int]:
    """The first `rows` articles with a title and a description unique among those kept;
    and how many were skipped on the way."""
    kept: list[Article] = []
    titles: set[str] = set()
    descriptions: set[str] = set()
    skipped = 0
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            row = json.loads(line)
            title, description = row["title"].strip(), row["description"].strip()
            if not title or not description or title in titles or description in descriptions:
                skipped += 1
                continue
            titles.add(title)
            descriptions.add(description)
            kept.append(Article(title, description))
            if len(kept) == rows:
                break
    return kept, skipped


class Cached(Embedder):
    """The queries' vectors, embedded beforehand (a batch, not one model call per query)."""

    def __init__(self, vectors: dict[str, np.ndarray], sparse: bool = False) -> None:
        self.model, self.dimension, self.max_texts = MODEL, DIMENSION, 1
        self.vectors = vectors
        self.sparse = sparse  # also the fake's sparse vectors (so hybrid fuses dense + sparse)

    async def embed(self, texts: Sequence[str], text_type: TextType) -> Embeddings:
        dense = np.stack([self.vectors[t] for t in texts]).astype(np.float32)
        if not self.sparse:
            return Embeddings(dense)
        return Embeddings(dense, sparse=[fake_sparse(t) for t in texts])


def fake_sparse(text: str) -> Any:
    """The fake provider's sparse vector of `text`, as the DashScope provider stores it."""
    return dashscope.sparse_vector([dict(e) for e in sparse_vector(text)])


async def fill(
    conn: asyncpg.Connection,
    rows: Sequence[tuple[str, str]],
    vectors: np.ndarray,
    namespace: str = NAMESPACE,
    sparse: bool = False,
) -> float:
    """Store (id, content) rows with their vectors in `namespace` (binary COPY, as the
    worker's direct path), and with `sparse` the fake's sparse vectors; seconds."""
    now = datetime.now(UTC)
    began = time.perf_counter()
    await conn.copy_records_to_table(
        "embeddings",
        records=[
            (
                namespace,
                id,
                np.asarray(vector, dtype=np.float32),
                content,
                hashlib.sha256(content.encode()).digest(),
                MODEL,
                DIMENSION,
                namespace,
                0,
                i,
                now,
                fake_sparse(content) if sparse else None,
            )
            for i, ((id, content), vector) in enumerate(zip(rows, vectors, strict=True))
        ],
        columns=(
            "namespace",
            "id",
            "embedding",
            "content",
            "content_hash",
            "model",
            "dimension",
            "source_topic",
            "source_partition",
            "source_offset",
            "event_time",
            "sparse",
        ),
    )
    return time.perf_counter() - began


async def measure(
    conn: asyncpg.Connection,
    embedder: Embedder,
    kept: list[Article],
    mode: Mode,
    rrf_k: int,
    candidates: int,
    queries: int | None = None,
) -> dict[str, float]:
    reciprocal, found = 0.0, 0
    began = time.perf_counter()
    for i, a in enumerate(kept[:queries]):
        hits = await search(
            conn, embedder, a.title, 10, NAMESPACE, mode=mode, rrf_k=rrf_k, candidates=candidates
        )
        ids = [h.id for h in hits]
        if str(i) in ids:
            found += 1
            reciprocal += 1 / (ids.index(str(i)) + 1)
    n = len(kept[:queries])
    return {
        "mrr@10": reciprocal / n,
        "recall@10": found / n,
        "ms_per_query": 1000 * (time.perf_counter() - began) / n,
    }


async def run(args: argparse.Namespace, admin_dsn: str) -> list[dict[str, Any]]:
    kept, skipped = articles(args.file, args.rows)
    cache = VectorCache(data_dir() / "vectors", MODEL)
    documents = await cache.embed([a.description for a in kept], TextType.DOCUMENT)
    queries = await cache.embed([a.title for a in kept], TextType.QUERY)
    by_title = {a.title: q for a, q in zip(kept, queries, strict=True)}
    # Hybrid is dense + lexical with the first, dense + sparse with the second.
    embedders = [Cached(by_title)] + ([Cached(by_title, sparse=True)] if args.sparse else [])
    results: list[dict[str, Any]] = []
    admin = await asyncpg.connect(admin_dsn)
    try:
        for config in args.config:
            name = f"retrieval_{config}"
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
            await admin.execute(f'CREATE DATABASE "{name}"')
            dsn = admin_dsn.replace("/postgres?", f"/{name}?", 1)
            conn = await asyncpg.connect(dsn)
            try:
                await migrate(conn, DIMENSION, text_search_config=config)
                await register_vector(conn)
                fill_s = await fill(
                    conn,
                    [(str(i), a.description) for i, a in enumerate(kept)],
                    documents,
                    sparse=args.sparse,
                )
                if args.lexical_index:
                    await index.create_lexical(conn)
                await conn.execute("ANALYZE embeddings")
                for mode, embedder in [(m, e) for e in embedders for m in args.mode]:
                    if mode is Mode.DENSE and (config != args.config[0] or embedder.sparse):
                        continue  # the same with every configuration
                    if mode in (Mode.SPARSE, Mode.LEXICAL) and embedder.sparse != (
                        mode is Mode.SPARSE
                    ):
                        continue  # each once
                    scores = await measure(
                        conn, embedder, kept, mode, args.rrf_k, args.candidates, args.queries
                    )
                    second = "sparse" if embedder.sparse else "lexical"
                    row = {
                        "config": config,
                        "mode": f"hybrid ({second})" if mode is Mode.HYBRID else mode.value,
                        "lexical_index": args.lexical_index,
                        "queries": len(kept[: args.queries]),
                        "rows": len(kept),
                        "skipped": skipped,
                        "fill_s": round(fill_s, 2),
                        **{k: round(v, 4) for k, v in scores.items()},
                    }
                    print(json.dumps(row), flush=True)
                    results.append(row)
            finally:
                await conn.close()
    finally:
        await admin.close()
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=SHARED / "ag_news" / "ag_news_test.jsonl")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--config", action="append", help="text search configuration(s)")
    parser.add_argument("--mode", action="append", type=Mode, help="default: all")
    parser.add_argument("--rrf-k", type=int, default=RRF_K)
    parser.add_argument("--candidates", type=int, default=CANDIDATES)
    parser.add_argument(
        "--lexical-index", action="store_true", help="with `index create --lexical`'s GIN index"
    )
    parser.add_argument(
        "--sparse", action="store_true", help="also sparse and dense+sparse hybrid (fake weights)"
    )
    parser.add_argument("--queries", type=int, help="measure the first N titles only (timing)")
    parser.add_argument("--dsn", help="a Postgres superuser DSN ending in /postgres?...")
    args = parser.parse_args(argv)
    args.config = args.config or ["simple", "english"]
    args.mode = args.mode or [m for m in Mode if args.sparse or m is not Mode.SPARSE]
    with_postgres(lambda dsn: run(args, dsn), args.dsn)


if __name__ == "__main__":
    main()
