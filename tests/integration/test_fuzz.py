"""Property-based fuzzing of event bytes through the real worker (hypothesis).

For any mix of random bytes and near-valid events the worker keeps running, and every record
ends up in exactly one place: the dead-letter topic (with a reason) or a stored row (whose
source position is the record's)."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakeapi import FakeEmbeddingServer
from tests.conftest import Env, dashscope, highest, migrate_db, running
from worker.events import Reason

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


@st.composite
def near_valid(draw: st.DrawFn) -> dict[str, Any]:
    """Events that are right in most fields and wrong in some."""
    event: dict[str, Any] = {"id": draw(st.uuids()).hex}
    if draw(st.booleans()):
        event["text"] = draw(st.text(max_size=60))
    else:
        event["text"] = draw(st.sampled_from(["ok text", "", "  ", "nul\x00", "\ud800x", "日本語"]))
    for field, values in {
        "op": st.sampled_from(["upsert", "upsert", "delete", "replace", 3]),
        "namespace": st.sampled_from(["news", "", None, 7]),
        "metadata": json_values,
        "text_type": st.sampled_from(["document", "query", "passage"]),
        "timestamp": st.sampled_from([0, -1, 1.7e12, 1e300, "2026-11-20T10:00:00Z", "yesterday"]),
    }.items():
        if draw(st.booleans()):
            event[field] = draw(values)
    return event


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode("utf-8", errors="surrogatepass")


records = st.lists(
    st.one_of(
        st.binary(max_size=120),
        near_valid().map(encode),
        st.text(max_size=80).map(lambda t: t.encode("utf-8", errors="surrogatepass")),
    ),
    min_size=30,
    max_size=80,
)


async def _round(env: Env, fake: FakeEmbeddingServer, values: list[bytes]) -> None:
    positions = await env.produce_records((None, v) for v in values)
    async with running(env.settings(dashscope(fake))) as worker:
        await env.wait_for_offsets(highest(positions))
        assert worker.pipeline is not None and worker.pipeline.fatal is None
    letters = await env.dead_letters(expected=0, seconds=2)
    lettered = {(x["source"]["partition"], x["source"]["offset"]) for x in letters}
    assert {x["reason"] for x in letters} <= {r.value for r in Reason}
    conn = await env.connect()
    try:
        rows = await conn.fetch("SELECT source_partition, source_offset FROM embeddings")
        tombstones = await conn.fetch("SELECT source_offset FROM embedding_tombstones")
    finally:
        await conn.close()
    stored = {(r["source_partition"], r["source_offset"]) for r in rows}
    assert not lettered & stored
    # Deletes leave no row but a tombstone; everything else is a row or a dead letter.
    accounted = len(lettered & set(positions)) + len(stored & set(positions)) + len(tombstones)
    assert accounted == len(positions), (len(lettered), len(stored), len(tombstones))


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(values=records)
def test_random_event_bytes_never_stop_the_worker(
    env: Env, fake_api: FakeEmbeddingServer, values: list[bytes]
) -> None:
    # A fresh loop in a thread: the test body is sync (hypothesis), the stack is shared.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _setup_and_round(env, fake_api, values)).result()


async def _setup_and_round(env: Env, fake: FakeEmbeddingServer, values: list[bytes]) -> None:
    await migrate_db(env, 256)
    conn = await env.connect()
    try:  # each example starts from an empty store and the end of the topic
        await conn.execute("TRUNCATE embeddings, embedding_tombstones")
    finally:
        await conn.close()
    await _round(env, fake, values)
