"""Retrieval quality on long documents, ``oversize_policy`` truncate vs chunk (issue 17).

Long documents with known answers, made from AG News: each document is ``--per-doc``
consecutive articles' descriptions of the shared test split, concatenated (about 1,560
estimated tokens at 24); the queries are the titles of ``--queries-per-doc`` of its articles,
spread over the document (the first, then evenly to the last), and each query's one relevant
document is the one holding its article. Dense search with the local model, exact (as
``worker.read.search`` without an HNSW index): a truncated document is one vector of its
text cut to ``--max-tokens`` (provider.max_tokens_per_text; the model itself sees at most
what it takes); a chunked one scores its best chunk, as search ranks documents. MRR@10 and
Recall@10, overall and by the query's position in its document (first article or later).

    python -m evaluation.chunking [--docs 200] [--per-doc 24] [--max-tokens 8192]
        [--chunk 512/64 --chunk 256/32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evaluation.baselines import VectorCache
from evaluation.offline import SHARED
from evaluation.retrieval import MODEL, articles
from worker.chunking import split
from worker.events import TextType
from worker.tokens import estimate_tokens, truncate_to_tokens


def scores(ranks: Sequence[int | None]) -> dict[str, float]:
    """MRR@10 and Recall@10 of 1-based ranks (None: not in the top 10)."""
    n = len(ranks)
    return {
        "mrr@10": sum(1 / r for r in ranks if r is not None and r <= 10) / n,
        "recall@10": sum(1 for r in ranks if r is not None and r <= 10) / n,
    }


def rank_of(doc_scores: np.ndarray, answer: int) -> int | None:
    rank = int((doc_scores > doc_scores[answer]).sum()) + 1
    return rank if rank <= 10 else None


async def run(args: argparse.Namespace) -> list[dict[str, object]]:
    kept, _ = articles(args.file, args.docs * args.per_doc)
    docs = [
        " ".join(a.description for a in kept[d * args.per_doc : (d + 1) * args.per_doc])
        for d in range(args.docs)
    ]
    picks = np.linspace(0, args.per_doc - 1, args.queries_per_doc).round().astype(int)
    queries = [
        (kept[d * args.per_doc + int(p)].title, d, int(p)) for d in range(args.docs) for p in picks
    ]
    cache = VectorCache(args.cache, MODEL)
    q = await cache.embed([t for t, _, _ in queries], TextType.QUERY)
    tokens = [estimate_tokens(d) for d in docs]
    results: list[dict[str, object]] = []

    def report(name: str, matrix: np.ndarray, texts: int) -> None:
        ranks = [rank_of(matrix[i], d) for i, (_, d, _) in enumerate(queries)]
        first = [r for r, (_, _, p) in zip(ranks, queries, strict=True) if p == 0]
        later = [r for r, (_, _, p) in zip(ranks, queries, strict=True) if p > 0]
        row: dict[str, object] = {
            "policy": name,
            "texts_embedded": texts,
            **{k: round(v, 4) for k, v in scores(ranks).items()},
            **{f"first_{k}": round(v, 4) for k, v in scores(first).items()},
            **{f"later_{k}": round(v, 4) for k, v in scores(later).items()},
        }
        print(json.dumps(row), flush=True)
        results.append(row)

    truncated = [truncate_to_tokens(d, args.max_tokens) for d in docs]
    whole = await cache.embed(truncated, TextType.DOCUMENT)
    report(f"truncate {args.max_tokens}", q @ whole.T, len(docs))
    for spec in args.chunk:
        size, overlap = (int(x) for x in spec.split("/"))
        owners: list[int] = []
        texts: list[str] = []
        for d, doc in enumerate(docs):
            for chunk in split(doc, size, overlap):
                owners.append(d)
                texts.append(chunk)
        vectors = await cache.embed(texts, TextType.DOCUMENT)
        similarity = q @ vectors.T
        best = np.full((len(queries), len(docs)), -np.inf, dtype=np.float32)
        np.maximum.at(best.T, np.asarray(owners), similarity.T)
        report(f"chunk {size}/{overlap}", best, len(texts))
    print(
        json.dumps(
            {"documents": len(docs), "queries": len(queries), "tokens_mean": float(np.mean(tokens))}
        )
    )
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=SHARED / "ag_news" / "ag_news_test.jsonl")
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--per-doc", type=int, default=24)
    parser.add_argument("--queries-per-doc", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8192, help="truncate's cut")
    parser.add_argument("--chunk", action="append", help="size/overlap; default 512/64 and 256/32")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/embedding-worker-vectors"))
    args = parser.parse_args(argv)
    args.chunk = args.chunk or ["512/64", "256/32"]
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
