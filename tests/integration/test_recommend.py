"""Recommendation on the embedded stack (local model, real broker and Postgres): interactions
become user profiles exactly once, `recommend --user` and `--history` return unseen rows near
what was read, and bad interactions are dead-lettered with their reason."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest

from tests.conftest import Env, migrate_db, running, wait_until
from tests.integration.test_analysis import read_topic
from tests.integration.test_cli import _env
from tests.integration.test_read_side import TOPICS, _corpus
from tests.processes import cli
from worker.config import Settings
from worker.kafka.clients import make_producer
from worker.model import Record
from worker.side import profiles
from worker.side.profiles import Interaction, Resolved
from worker.sinks import postgres as store

DAY = 24 * 3600.0
SPACE = {f"space-{i}" for i in range(len(TOPICS["space"]))} | {"space-dup"}
BAKING = {f"baking-{i}" for i in range(len(TOPICS["baking"]))}


async def produce(env: Env, topic: str, values: list[tuple[bytes, bytes | dict[str, Any]]]) -> int:
    """Produce (key, value) in order to a one-partition topic; the offset after the last."""
    producer = make_producer(env.settings().kafka)
    await producer.start()
    try:
        last = -1
        for key, v in values:
            raw = json.dumps(v).encode() if isinstance(v, dict) else v
            last = (await (await producer.send(topic, key=key, value=raw))).offset
        return last + 1
    finally:
        await producer.stop()


async def applied_to(env: Env, settings: Settings, topic: str) -> int:
    conn = await env.connect()
    try:
        group = f"{settings.kafka.group_id}.interactions"
        return (await store.load_offsets(conn, group, topic)).get(0, 0)
    finally:
        await conn.close()


async def wait_for_interactions(env: Env, settings: Settings, topic: str, end: int) -> None:
    async def done() -> bool:
        return await applied_to(env, settings, topic) >= end

    await wait_until(done, 60, "the interactions were not all applied")


async def profile(env: Env, user: str) -> tuple[int, float, set[str]]:
    """(interactions applied, decayed weight, items seen) of a user of `news`."""
    conn = await env.connect()
    try:
        row = await conn.fetchrow(
            "SELECT interactions, weight FROM profiles WHERE namespace = 'news' AND user_id = $1",
            user,
        )
        seen = await conn.fetch(
            "SELECT item_id FROM profile_items WHERE namespace = 'news' AND user_id = $1", user
        )
    finally:
        await conn.close()
    assert row is not None, f"no profile of {user}"
    return row["interactions"], row["weight"], {r["item_id"] for r in seen}


async def recommend(env: Env, *args: str) -> list[str]:
    code, out, err = await cli("recommend", "--namespace", "news", *args, "--json", **_env(env))
    assert code == 0, err
    return [json.loads(line)["id"] for line in out.splitlines()]


async def documented_sql(env: Env, user: str, k: int) -> list[str]:
    """docs/recommend.md's SQL for `recommend --user`, run as a reader of the docs would."""
    doc = (Path(__file__).parents[2] / "docs" / "recommend.md").read_text()
    [sql] = [b for b in re.findall(r"```sql\n(.*?)```", doc, re.S) if "NOT EXISTS" in b]
    sql = sql.replace("'u-17'", f"'{user}'").replace("LIMIT 5", f"LIMIT {k}")
    conn = await env.connect()
    try:
        return [r["id"] for r in await conn.fetch(sql)]
    finally:
        await conn.close()


async def test_interactions_make_profiles_once_and_recommend_unseen_rows_near_them(
    env: Env,
) -> None:
    await migrate_db(env, 512)
    interactions = env.topic.replace(".events", ".interactions")
    dlq = interactions + ".dlq"
    await env.stack.create_topics([interactions, dlq], partitions=1)
    settings = env.settings(
        recommend={
            "interactions_topic": interactions,
            "interactions_dlq_topic": dlq,
            "half_life_s": DAY,
            "grace_s": 0.5,
        }
    )
    now = datetime.now(UTC)

    def seen(user: str, item: str, days_ago: float, **extra: Any) -> tuple[bytes, dict[str, Any]]:
        at = (now - timedelta(days=days_ago)).isoformat()
        return user.encode(), {"user": user, "item": item, "time": at, "namespace": "news", **extra}

    first: list[tuple[bytes, bytes | dict[str, Any]]] = [
        # ann read three space stories a day apart, the latest first (out of order).
        seen("ann", "space-2", 0),
        seen("ann", "space-0", 2),
        (b"ann", b"{not json"),
        seen("ann", "no-such-story", 0),
        seen("ann", "space-1", 1, weight=-1),
        seen("ann", "space-1", 1),
        seen("bob", "baking-0", 0, weight=2),
        (b"bob", {"user": "bob", "namespace": "news"}),
        seen("bob", "baking-1", 0),
    ]
    async with running(settings) as worker:
        await env.wait_for_offsets(await env.produce(_corpus()))
        end = await produce(env, interactions, first)
        await wait_for_interactions(env, settings, interactions, end)
        scraped = generate_latest(worker.metrics.registry).decode()
        assert worker.checks()["interactions_consuming"]
    assert "embedding_worker_interactions_applied_total 5.0" in scraped
    assert 'embedding_worker_interactions_dead_lettered_total{reason="unknown_id"} 1.0' in scraped

    count, weight, items = await profile(env, "ann")
    assert count == 3
    assert weight == pytest.approx(1 + 0.5 + 0.25, abs=1e-4)  # one half-life per day
    assert items == {"space-0", "space-1", "space-2"}
    count, weight, _ = await profile(env, "bob")
    assert count == 2 and weight == pytest.approx(3.0, abs=1e-4)

    letters = await read_topic(env, dlq, 4)
    reasons = {(m["source"]["offset"], m["reason"]) for _, m in letters}
    assert reasons == {
        (2, "invalid_json"),
        (3, "unknown_id"),
        (4, "schema_violation"),
        (7, "schema_violation"),
    }
    assert any(m["id"] == "no-such-story" for _, m in letters)

    ann = await recommend(env, "--user", "ann", "-k", "3")
    assert len(ann) == 3 and set(ann) <= SPACE - items, ann
    bob = await recommend(env, "--user", "bob", "-k", "3")
    assert len(bob) == 3 and set(bob) <= BAKING - {"baking-0", "baking-1"}, bob
    assert await documented_sql(env, "ann", 3) == ann  # docs/recommend.md's SQL agrees
    lean = await recommend(env, "--user", "ann", "-k", "2", "--where", "lang=en")
    assert set(lean) == {"space-3", "space-dup"}  # space-4 is lang=xx

    # A restart reads from the offsets stored with the profiles: nothing applied twice.
    async with running(settings):
        end = await produce(env, interactions, [seen("ann", "space-3", 0)])
        await wait_for_interactions(env, settings, interactions, end)
    count, weight, items = await profile(env, "ann")
    assert count == 4
    assert weight == pytest.approx(2.75, abs=1e-3)
    assert "space-3" in items
    assert "space-3" not in await recommend(env, "--user", "ann", "-k", "5")


async def test_recommend_by_history_and_its_errors(env: Env) -> None:
    await migrate_db(env, 512)
    async with running(env.settings()):
        await env.wait_for_offsets(await env.produce(_corpus()))
    hits = await recommend(env, "--history", "space-0,baking-0,space-1", "-k", "20")
    assert not {"space-0", "space-1", "baking-0"} & set(hits)
    assert set(hits[:2]) <= SPACE, hits  # two of the three were space stories
    code, out, err = await cli(
        "recommend", "--history", "space-0,nope", "--namespace", "news", **_env(env)
    )
    assert (code, out) == (1, "")
    assert "'nope'" in err and "'news'" in err and "Traceback" not in err
    code, out, err = await cli("recommend", "--user", "nobody", **_env(env))
    assert (code, out) == (1, "")
    assert "no profile of user 'nobody'" in err and "Traceback" not in err


async def test_an_interaction_read_again_by_a_stale_consumer_is_not_applied_twice(
    env: Env,
) -> None:
    """The offsets are locked and checked in the transaction that applies a fetch."""
    await migrate_db(env, 4)
    t = datetime(2026, 5, 1, tzinfo=UTC)
    fetch = [
        Resolved(
            Interaction(Record("i", 0, offset, b"u", b"{}"), "news", "u", item, 1.0, at),
            np.array(vector, dtype=np.float64),
        )
        for offset, item, vector, at in (
            (0, "a", [1, 0, 0, 0], t),
            (1, "b", [0, 1, 0, 0], t + timedelta(days=1)),
        )
    ]
    conn = await env.connect()
    try:
        apply = partial(
            profiles.apply, conn, model="m", half_life_s=DAY, seen_max=1, group_id="g", topic="i"
        )
        assert await apply(fetch, offsets={0: 2}) == 2
        assert await apply(fetch, offsets={0: 2}) == 0
        assert await apply(fetch[1:], offsets={0: 2}) == 0
        row = await conn.fetchrow("SELECT interactions, weight, mean FROM profiles")
        items = await conn.fetch("SELECT item_id FROM profile_items")
    finally:
        await conn.close()
    assert row is not None
    assert (row["interactions"], row["weight"]) == (2, 1.5)
    np.testing.assert_allclose(row["mean"].to_numpy(), [1 / 3, 2 / 3, 0, 0], rtol=1e-6)
    assert [r["item_id"] for r in items] == ["b"]  # seen_max = 1 keeps the latest
