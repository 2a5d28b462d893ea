"""Retrieval quality on a public benchmark with graded relevance (issue 17): BEIR SciFact.

5,183 abstracts; the 300 test claims as queries, with BEIR's relevance judgements (qrels).
Read from git mirrors of public repositories (``fetch``; ``--repo OWNER/NAME=PATH`` for a
clone elsewhere), at pinned commits, never copied into this repository:

- corpus: ``data/scifact.zip`` of sumithra-p-v/claimverifier, whose ``corpus_train.csv`` is
  SciFact's corpus as the Hugging Face ``allenai/scifact`` release has it (doc_id, title,
  the abstract as a list of sentences), the sentences joined by spaces here. BEIR's own
  corpus.jsonl (7.8 MB) is in no snapshot at hand (``fetch`` omits files of 4 MiB and
  more), so the texts were not compared with it; every judged document is in this corpus.
- queries: ``scifact/queries.jsonl`` of Kirloxious/CSI4107_Assignment2, in BEIR's format
  (its SHA-256 is the Git LFS object id of moorateeahtashil/Information-Retrieval's copy).
- qrels: ``scifact/qrels/test.tsv`` of moorateeahtashil/Information-Retrieval, BEIR's test
  split (339 pairs over 300 queries; Kirloxious's copy has the same pairs).

Each abstract is stored as a row (content: title, newline, text) through migration 0006 with
each text search configuration, and each claim searched with ``worker.read.search.search`` in each
mode, k = 100: nDCG@10 and Recall@100 as BEIR computes them (trec_eval: gain = the judged
relevance, here always 1; the ideal ranking from all judged documents). Vectors come from the
local model through ``evaluation.baselines.VectorCache`` (cached outside the repository);
dense search is exact (no HNSW index).

    python -m evaluation.beir [--config simple --config english] [--dsn DSN]
"""

from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import math
import subprocess
import tokenize
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from pgvector.asyncpg import register_vector

from evaluation.baselines import VectorCache
from evaluation.datasets import data_dir
from evaluation.postgres import with_postgres
from evaluation.retrieval import MODEL, Cached, fill
from worker.events import TextType
from worker.read.search import CANDIDATES, RRF_K, Mode, search
from worker.sinks.migrate import migrate

NAMESPACE = "scifact"
DEPTH = 100  # Recall@100


@dataclass(frozen=True)
class Source:
    repo: str
    commit: str
    path: str


CORPUS = Source(
    "sumithra-p-v/claimverifier", "b42f1c3444b28884ddcfadffafbfe223646c6c37", "data/scifact.zip"
)
QUERIES = Source(
    "Kirloxious/CSI4107_Assignment2",
    "640c17fd9b4a27f3962d702351016bb677d74305",
    "scifact/queries.jsonl",
)
QRELS = Source(
    "moorateeahtashil/Information-Retrieval",
    "00b74e83a48f52e6588946861a3bd6cfe9f7fede",
    "scifact/qrels/test.tsv",
)


def read(source: Source, repos: dict[str, Path]) -> bytes:
    where = repos.get(source.repo) or Path("/work/.mirror") / source.repo.replace("/", "+") / "repo"
    done = subprocess.run(
        ["git", "-C", str(where), "show", f"{source.commit}:{source.path}"], capture_output=True
    )
    if done.returncode != 0:
        raise SystemExit(
            f"cannot read {source.path} of {source.repo} at {where}: {done.stderr.decode()}"
            f"clone https://github.com/{source.repo} and pass --repo {source.repo}=PATH"
        )
    return done.stdout


def sentences(abstract: str) -> list[str]:
    """The sentences of the CSV's abstract: a printed array of Python string literals."""
    tokens = tokenize.generate_tokens(io.StringIO(abstract).readline)
    return [ast.literal_eval(t.string) for t in tokens if t.type == tokenize.STRING]


def corpus(repos: dict[str, Path]) -> list[tuple[str, str]]:
    """(doc_id, title + newline + text) of every abstract."""
    csv.field_size_limit(1 << 30)
    with (
        zipfile.ZipFile(io.BytesIO(read(CORPUS, repos))) as z,
        z.open("corpus_train.csv") as raw,
    ):
        rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))
    return [(r["doc_id"], f"{r['title']}\n{' '.join(sentences(r['abstract']))}") for r in rows]


def judged(repos: dict[str, Path]) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """The test queries' texts, and their qrels: query id -> {doc id: relevance}."""
    qrels: dict[str, dict[str, int]] = {}
    lines = read(QRELS, repos).decode().splitlines()
    for line in lines[1:]:  # the header
        query, doc, score = line.strip().split("\t")
        qrels.setdefault(query, {})[doc] = int(score)
    texts = {}
    for line in read(QUERIES, repos).decode().splitlines():
        row = json.loads(line)
        if row["_id"] in qrels:
            texts[row["_id"]] = row["text"]
    return texts, qrels


def ndcg(ranked: Sequence[str], relevant: dict[str, int], k: int = 10) -> float:
    dcg = sum(relevant.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    return dcg / sum(g / math.log2(i + 2) for i, g in enumerate(ideal))


def recall(ranked: Sequence[str], relevant: dict[str, int], k: int = DEPTH) -> float:
    wanted = {d for d, g in relevant.items() if g > 0}
    return len(wanted & set(ranked[:k])) / len(wanted)


async def run(args: argparse.Namespace, admin_dsn: str) -> list[dict[str, Any]]:
    docs = corpus(args.repo)
    texts, qrels = judged(args.repo)
    cache = VectorCache(data_dir() / "vectors", MODEL)
    documents = await cache.embed([content for _, content in docs], TextType.DOCUMENT)
    order = sorted(texts)
    claims = await cache.embed([texts[q] for q in order], TextType.QUERY)
    embedder = Cached({texts[q]: v for q, v in zip(order, claims, strict=True)})
    print(f"{len(docs)} documents, {len(order)} queries, {sum(map(len, qrels.values()))} qrels")
    results: list[dict[str, Any]] = []
    admin = await asyncpg.connect(admin_dsn)
    try:
        for config in args.config:
            name = f"beir_scifact_{config}"
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
            await admin.execute(f'CREATE DATABASE "{name}"')
            conn = await asyncpg.connect(admin_dsn.replace("/postgres?", f"/{name}?", 1))
            try:
                await migrate(conn, documents.shape[1], text_search_config=config)
                await register_vector(conn)
                await fill(conn, docs, documents, NAMESPACE)
                await conn.execute("ANALYZE embeddings")
                for mode in args.mode:
                    if mode is Mode.DENSE and config != args.config[0]:
                        continue  # the same with every configuration
                    scores: dict[str, list[float]] = {"ndcg@10": [], "recall@100": []}
                    for q in order:
                        hits = await search(
                            conn,
                            embedder,
                            texts[q],
                            DEPTH,
                            NAMESPACE,
                            mode=mode,
                            rrf_k=args.rrf_k,
                            candidates=args.candidates,
                        )
                        ranked = [h.id for h in hits]
                        scores["ndcg@10"].append(ndcg(ranked, qrels[q]))
                        scores["recall@100"].append(recall(ranked, qrels[q]))
                    row = {
                        "config": config,
                        "mode": mode.value,
                        **{k: round(sum(v) / len(v), 4) for k, v in scores.items()},
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
    parser.add_argument("--config", action="append", help="text search configuration(s)")
    parser.add_argument(
        "--mode", action="append", type=Mode, help="default: dense, lexical, hybrid"
    )
    parser.add_argument("--rrf-k", type=int, default=RRF_K)
    parser.add_argument("--candidates", type=int, default=CANDIDATES)
    parser.add_argument(
        "--repo",
        action="append",
        default=[],
        metavar="OWNER/NAME=PATH",
        help="a local git copy of a source repository (default: the fetch mirror)",
    )
    parser.add_argument("--dsn", help="a Postgres superuser DSN ending in /postgres?...")
    args = parser.parse_args(argv)
    args.config = args.config or ["simple", "english"]
    # No sparse vectors here (the local model has none): dense, lexical, hybrid.
    args.mode = args.mode or [Mode.DENSE, Mode.LEXICAL, Mode.HYBRID]
    args.repo = {k: Path(v) for k, _, v in (spec.partition("=") for spec in args.repo)}
    with_postgres(lambda dsn: run(args, dsn), args.dsn)


if __name__ == "__main__":
    main()
