"""Chunking of long texts (oversize_policy = chunk): the splitter, decode, and a chunked
document's way through the real pipeline (batched and embedded chunk by chunk, written once
whole), around a fake consumer and store."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from tests.conftest import wait_until
from tests.pipeline_fakes import P0, FakeConsumer, FakeStore, Msg, NoDeadLetters, T
from worker.chunking import split
from worker.config import ConfigError, OversizePolicy, load_settings
from worker.embedding.providers.base import Embedder, Embeddings, PermanentError
from worker.events import TextType
from worker.model import Change, Record, content_hash
from worker.pipeline import runner as pl
from worker.pipeline.decode import Limits, decode
from worker.sinks.postgres import WriteResult, copy_records
from worker.tokens import estimate_tokens

SENTENCES = [f"Sentence {i} is about subject {i % 7} and nothing else." for i in range(120)]
LONG = " ".join(SENTENCES)


def test_chunks_fit_the_budget_overlap_and_cover_the_text() -> None:
    chunks = split(LONG, 100, 30)
    assert len(chunks) > 5
    assert all(estimate_tokens(c) <= 100 for c in chunks)
    for before, after in itertools.pairwise(chunks):
        assert after.split(".")[0] + "." in before  # the next chunk starts inside this one
    words = set(" ".join(chunks).split())
    assert words == set(LONG.split())
    # Cut between sentences, never inside one.
    assert all(c.endswith(".") for c in chunks)


def test_a_text_within_the_budget_is_one_chunk_and_white_space_none() -> None:
    assert split("short text", 100, 20) == ["short text"]
    assert split("   \n ", 100, 20) == []


def test_the_overlap_must_be_below_the_chunk_size() -> None:
    with pytest.raises(ConfigError, match="overlap_tokens"):
        load_settings(chunking={"max_tokens": 32, "overlap_tokens": 32})
    assert load_settings().chunking.max_tokens == 256


def _limits(chunk_tokens: int = 100, overlap: int = 20, max_tokens: int = 8192) -> Limits:
    return Limits(
        default_namespace="default",
        max_tokens_per_text=max_tokens,
        oversize_policy=OversizePolicy.CHUNK,
        max_metadata_bytes=64_000,
        chunk_tokens=chunk_tokens,
        chunk_overlap_tokens=overlap,
    )


def _record(text: str, offset: int = 0) -> Record:
    value = json.dumps({"id": "doc", "text": text, "metadata": {"lang": "en"}}).encode()
    return Record(T, 0, offset, b"doc", value, 1_700_000_000_000)


def test_decode_splits_a_long_text_and_hashes_the_whole_text_with_the_budget() -> None:
    change = decode(_record(LONG), _limits())
    assert isinstance(change, Change)
    assert change.chunks == tuple(split(LONG, 100, 20))
    assert change.text == LONG and not change.truncated
    assert change.tokens == sum(estimate_tokens(c) for c in change.chunks)
    assert change.content_hash == content_hash(LONG, TextType.DOCUMENT, "chunks 100/20")
    other = decode(_record(LONG), _limits(chunk_tokens=200))
    assert isinstance(other, Change) and other.content_hash != change.content_hash


def test_a_text_within_the_budget_is_embedded_whole_with_the_same_hash_as_truncate() -> None:
    change = decode(_record("a short document"), _limits())
    assert isinstance(change, Change)
    assert change.chunks == () and change.text == "a short document"
    assert change.content_hash == content_hash("a short document", TextType.DOCUMENT)


def test_the_budget_is_capped_at_what_the_model_takes() -> None:
    change = decode(_record(LONG), _limits(chunk_tokens=512, max_tokens=50))
    assert isinstance(change, Change)
    assert max(estimate_tokens(c) for c in change.chunks) <= 50


def test_a_chunked_document_has_one_row_per_chunk_with_its_metadata_and_hash() -> None:
    change = decode(_record(LONG), _limits())
    assert isinstance(change, Change)
    pieces = change.embeddables()
    assert [p.chunk for p in pieces] == list(range(len(change.chunks)))
    assert all(p.document is change and p.record is change.record for p in pieces)
    for p in pieces:
        p.vector = np.full(4, p.chunk, dtype=np.float32)
    rows = copy_records(change)
    assert [r[-2] for r in rows] == list(range(len(pieces)))  # the chunk column
    assert [r[3] for r in rows] == list(change.chunks)  # each row's content is its chunk
    assert {r[4] for r in rows} == {change.content_hash}
    assert {r[6] for r in rows} == {'{"lang":"en"}'}
    assert [float(np.asarray(r[2])[0]) for r in rows] == [float(p.chunk) for p in pieces]


class Recording(Embedder):
    """Two texts per request; refuses any text containing ``refuse``."""

    model, dimension, max_texts = "m", 4, 2

    def __init__(self) -> None:
        self.requests: list[list[str]] = []

    async def embed(self, texts: Any, text_type: TextType) -> Embeddings:
        self.requests.append(list(texts))
        if any("refuse" in t for t in texts):
            raise PermanentError("refused", code="InvalidParameter")
        return Embeddings(np.ones((len(texts), 4), dtype=np.float32))


class Msgs(Msg):
    def __init__(self, offset: int, id: str, text: str) -> None:
        super().__init__(0, offset)
        self.key = id.encode()
        self.value = json.dumps({"id": id, "text": text}).encode()


async def _run(messages: list[Msg], embedder: Recording) -> tuple[list[list[Change]], int]:
    settings = load_settings(
        kafka={"input_topic": T},
        provider={"kind": "dashscope", "api_key": "x", "dimension": 64},
        batch={"linger_ms": 0, "writers": 1},
        http={"enabled": False},
        oversize_policy="chunk",
        chunking={"max_tokens": 100, "overlap_tokens": 20},
    )
    transactions: list[list[Change]] = []
    stored: dict[int, int] = {}

    async def write(changes: Sequence[Change], offsets: Any) -> WriteResult:
        transactions.append(list(changes))
        for (_, partition), offset in offsets.items():
            stored[partition] = offset
        return WriteResult(upserted=len(changes))

    consumer = FakeConsumer()
    p = pl.Pipeline(settings, consumer, NoDeadLetters(), FakeStore(write=write), embedder)  # type: ignore[arg-type]
    await p.on_partitions_assigned([P0])
    stop = asyncio.Event()
    run = asyncio.create_task(p.run(stop))
    await consumer.script.put({P0: messages})
    last = messages[-1].offset + 1

    async def done() -> bool:
        return stored.get(0) == last

    await wait_until(done, 10, "every offset stored")
    stop.set()
    await run
    return transactions, sum(p.stats.dead_lettered.values())


async def test_a_document_embedded_across_requests_is_written_once_with_all_its_chunks() -> None:
    embedder = Recording()
    transactions, dead = await _run([Msgs(0, "doc", LONG), Msgs(1, "small", "tiny")], embedder)
    chunks = split(LONG, 100, 20)
    assert len(chunks) > 2
    # Two texts per request, so the chunks went out over several requests...
    assert all(len(r) <= 2 for r in embedder.requests)
    assert sorted(t for r in embedder.requests for t in r) == sorted([*chunks, "tiny"])
    # ... and the document reached the writer once, whole, with a vector per chunk.
    written = [c for t in transactions for c in t]
    docs = [c for c in written if c.id == "doc"]
    assert len(docs) == 1 and docs[0].pieces is not None
    assert [p.text for p in docs[0].pieces] == chunks
    assert all(p.vector is not None for p in docs[0].pieces)
    assert docs[0].vector is docs[0].pieces[0].vector  # what the analysis sees
    assert sorted(c.id for c in written) == ["doc", "small"]
    assert dead == 0


async def test_one_refused_chunk_dead_letters_the_document_once_and_writes_none_of_it() -> None:
    embedder = Recording()
    text = LONG + " Then refuse this one. " + LONG
    transactions, dead = await _run([Msgs(0, "doc", text), Msgs(1, "ok", "fine")], embedder)
    written = [c.id for t in transactions for c in t]
    assert written == ["ok"]
    assert dead == 1
