"""The search-speed benchmark's distinct real texts: ~150,000 tweets of TweetEval.

Source: TweetEval (Barbieri et al., Findings of EMNLP 2020), ``cardiffnlp/tweeteval`` at
commit ``4fbd22cd78421f05b1ecdb4fc5725bc7a7bd8f66``, every ``datasets/**/*_text.txt`` file
(one tweet a line) except ``datasets/sentiment/train_text.txt``, which is over the fetch
mirror's 4 MiB size cap. AG News's 120,000-row train split, the first choice, could not be
had: every public copy found is one file over the cap. Licence: TweetEval is released
without restrictions of its own; the tweets' source terms (Twitter) and each task's dataset
licence apply, so the texts and vectors stay outside the repository.

Texts are whitespace-collapsed, kept if they have at least three words, and deduplicated
(case folded); then put in a seeded random order: the first ``queries`` are the queries, the
next ``rows`` the stored rows, so no query is among the rows. Vectors come from the local
model through ``evaluation.baselines.VectorCache``, one cache file per shard of
``SHARD`` texts under ``data_dir()/vectors/search_speed``, so a stopped run keeps every
finished shard (~90 tweets/s on one core: ~20 min for 100,000).

    python -m benchmarks.search_rows [--rows 100000] [--queries 200]   # embed ahead
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation.baselines import VectorCache
from evaluation.datasets import data_dir
from evaluation.retrieval import MODEL
from worker.events import TextType

REPO = "cardiffnlp/tweeteval"
COMMIT = "4fbd22cd78421f05b1ecdb4fc5725bc7a7bd8f66"
OVER_CAP = {"datasets/sentiment/train_text.txt"}
SEED = 17
SHARD = 10_000
MIN_WORDS = 3


@dataclass(frozen=True)
class Texts:
    queries: list[str]
    rows: list[str]
    pool: int  # distinct texts kept before the split


def _git(mirror: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(mirror), *args], check=True, capture_output=True, text=True
    ).stdout


def tweets(mirror: Path) -> list[str]:
    """The distinct tweets of every text file at COMMIT, sorted (input order fixed)."""
    paths = [
        p
        for p in _git(mirror, "ls-tree", "-r", "--name-only", COMMIT, "datasets").splitlines()
        if p.endswith("_text.txt") and p not in OVER_CAP
    ]
    seen: dict[str, str] = {}
    for path in sorted(paths):
        for line in _git(mirror, "show", f"{COMMIT}:{path}").splitlines():
            text = " ".join(line.split())
            if sum(any(c.isalpha() for c in w) for w in text.split()) >= MIN_WORDS:
                seen.setdefault(text.casefold(), text)
    return sorted(seen.values())


def split(pool: Sequence[str], queries: int, rows: int, seed: int = SEED) -> Texts:
    if queries + rows > len(pool):
        raise SystemExit(f"{queries} queries + {rows} rows: only {len(pool)} distinct texts")
    order = np.random.default_rng(seed).permutation(len(pool))
    chosen = [pool[int(i)] for i in order[: queries + rows]]
    return Texts(chosen[:queries], chosen[queries:], len(pool))


def load(queries: int, rows: int, mirror: Path | None = None) -> Texts:
    where = mirror or Path("/work/.mirror") / REPO.replace("/", "+") / "repo"
    if not where.is_dir():
        raise SystemExit(f"no git copy of {REPO} at {where}: clone it and pass --mirror PATH")
    return split(tweets(where), queries, rows)


async def embed(texts: Sequence[str], text_type: TextType) -> np.ndarray:
    """Unit float32 vectors, cached shard by shard."""
    root = data_dir() / "vectors" / "search_speed" / text_type.value
    out = []
    for start in range(0, len(texts), SHARD):
        began = time.perf_counter()
        cache = VectorCache(root / f"{start // SHARD:03d}", MODEL)
        chunk = texts[start : start + SHARD]
        out.append(np.asarray(await cache.embed(chunk, text_type), dtype=np.float32))
        print(f"{text_type.value} {start + len(chunk)}: {time.perf_counter() - began:.0f} s")
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


async def prepare(args: argparse.Namespace) -> None:
    texts = load(args.queries, args.rows, args.mirror)
    print(f"{texts.pool} distinct tweets; {len(texts.queries)} queries, {len(texts.rows)} rows")
    await embed(texts.queries, TextType.QUERY)
    await embed(texts.rows, TextType.DOCUMENT)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--mirror", type=Path, help=f"a git copy of {REPO}")
    asyncio.run(prepare(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
