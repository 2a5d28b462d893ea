"""``reembed.dual_write`` on the embedded stack (broker, Postgres, the fake provider): the
worker writes each event into a re-embed target too, in the transaction of its rows and
offsets, so the switch has nothing left to embed; the target's provider refusing a text,
or being down, never holds the worker's rows; a target dropped under the running worker is
let go; with the analysis on, its state and the target's rows join one transaction."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest

from fakeapi import FakeConfig, FakeEmbeddingServer, fake_vector
from tests.conftest import API_KEY, Env, dashscope, migrate_db, running, wait_until
from tests.integration.test_reembed import table
from worker.app import Worker
from worker.config import Settings
from worker.tools.reembed import Reembed, status

OLD, NEW = 64, 128
TARGET = {"model": "text-embedding-v3", "dimension": NEW}
POISON = "FORBIDDEN"


def event(i: int, text: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": f"doc-{i}", "text": text or f"document {i} about topic {i % 7}", **extra}


def dual_settings(
    env: Env, fake: FakeEmbeddingServer, refresh_s: float = 0.2, **extra: Any
) -> Settings:
    return env.settings(
        dashscope(fake, OLD, breaker_failures=2, breaker_cooldown_s=0.5),
        reembed={
            "dual_write": True,
            "dual_write_refresh_s": refresh_s,
            "dual_write_timeout_s": 2.0,
        },
        **extra,
    )


async def writing_into(worker: Worker, name: str | None) -> None:
    """Until the worker writes into the target ``name`` (None: into none)."""

    async def found() -> bool:
        dual = worker.pipeline.dual if worker.pipeline is not None else None
        assert dual is not None
        return (name in dual.targets) if name is not None else not dual.targets

    await wait_until(found, 30, f"the worker did not find the targets ({name})")


@pytest.fixture
def target_api() -> Iterator[FakeEmbeddingServer]:
    """A provider of the target's own (its faults are not the worker's)."""
    with FakeEmbeddingServer(FakeConfig(api_key=API_KEY)) as server:
        yield server


async def test_events_after_start_land_in_the_target_and_the_switch_embeds_nothing(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, OLD)
    settings = dual_settings(env, fake_api)
    async with running(settings) as worker:
        await env.wait_for_offsets(await env.produce([event(i) for i in range(20)]))
        report = await Reembed(settings, "v3", page_rows=7, progress=False).start(TARGET)
        assert report.embedded == 20
        await writing_into(worker, "v3")
        # New rows, new content, a new version of the same content, a delete.
        changes = [
            *(event(i) for i in range(20, 40)),
            event(1, "document 1, edited"),
            event(2, metadata={"lang": "de"}),
            {"id": "doc-3", "op": "delete"},
        ]
        await env.wait_for_offsets(await env.produce(changes))
        assert worker.pipeline is not None
        stats = worker.pipeline.stats
        assert stats.dual_written["v3"] == 21 and not stats.dual_left
        assert stats.dual_requests["v3"] > 0
        (shown,) = await status(settings, "v3")
        assert shown.counts is not None
        assert (shown.counts.pending, shown.counts.current, shown.counts.target) == (0, 39, 39)
    rows = await table(env, "reembed_v3")
    current = await table(env, "embeddings")
    assert set(rows) == set(current) == {f"doc-{i}" for i in range(40)} - {"doc-3"}
    for key, row in rows.items():
        assert (row["model"], row["dimension"]) == ("text-embedding-v3", NEW)
        assert np.allclose(row["embedding"].to_numpy(), fake_vector(row["content"], NEW), atol=1e-5)
        for column, value in current[key].items():
            if column not in ("embedding", "model", "dimension"):
                assert row[column] == value, (key, column)
    assert rows["doc-1"]["content"] == "document 1, edited"
    assert rows["doc-2"]["metadata"] == '{"lang": "de"}'
    # Nothing left for the switch: not one row under the lock (max_locked 0), no request.
    fake_api.reset_stats()
    switch = Reembed(settings, "v3", page_rows=7, progress=False)
    final = await switch.switch(0, 10)
    assert (final.pending, final.target) == (0, 39)
    assert (switch.report.embedded, switch.report.copied) == (0, 0)
    assert fake_api.stats()["requests"] == 0


async def test_the_targets_refusals_and_outage_never_hold_the_workers_rows(
    env: Env, fake_api: FakeEmbeddingServer, target_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, OLD)
    settings = dual_settings(env, fake_api)
    await Reembed(settings, "v3", progress=False).start(
        {**TARGET, "base_url": target_api.url + "/api/v1"}
    )
    target_api.configure(poison=[POISON])
    async with running(settings) as worker:
        await writing_into(worker, "v3")
        # A text the target's provider refuses for good: stored, not dead-lettered.
        await env.wait_for_offsets(
            await env.produce([event(i) for i in range(10)] + [event(10, f"a {POISON} text")])
        )
        assert worker.pipeline is not None
        stats = worker.pipeline.stats
        assert stats.dual_left == {("v3", "refused"): 1}
        assert stats.dual_written["v3"] == 10
        scraped = generate_latest(worker.metrics.registry).decode()
        assert 'embedding_worker_reembed_dual_write_rows_total{target="v3"} 10.0' in scraped
        left = 'embedding_worker_reembed_dual_write_left_total{reason="refused",target="v3"} 1.0'
        assert left in scraped
        assert 'embedding_worker_reembed_dual_write_requests_total{target="v3"}' in scraped
        # The target's provider down: the worker's rows are stored all the same.
        target_api.configure(rate_500=1.0)
        await env.wait_for_offsets(await env.produce([event(i) for i in range(11, 31)]))
        assert stats.dual_left[("v3", "unavailable")] > 0
        assert stats.dual_written["v3"] == 10
        assert worker.pipeline.fatal is None and not stats.dead_lettered
    assert await env.dead_letters(0, seconds=2) == []
    current = await table(env, "embeddings")
    rows = await table(env, "reembed_v3")
    assert set(current) == {f"doc-{i}" for i in range(31)}
    assert "doc-10" not in rows and set(rows) < set(current)
    # The catch-up takes what was left: the refused text dead-lettered by the re-embed.
    target_api.configure(rate_500=0.0)
    (before,) = await status(settings, "v3")
    assert before.counts is not None and before.counts.pending == 31 - len(rows)
    report = await Reembed(settings, "v3", progress=False).start({})
    assert (report.embedded, report.refused) == (31 - len(rows) - 1, 1)
    (letter,) = await env.dead_letters(1)
    assert letter["id"] == "doc-10" and "re-embed v3" in letter["message"]


async def test_a_target_dropped_under_the_running_worker_is_let_go(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, OLD)
    # Refreshed rarely: the worker learns of the drop from the write the table refuses.
    settings = dual_settings(env, fake_api, refresh_s=3600)
    await Reembed(settings, "v3", progress=False).start(TARGET)
    async with running(settings) as worker:
        await writing_into(worker, "v3")
        await env.wait_for_offsets(await env.produce([event(i) for i in range(10)]))
        assert worker.pipeline is not None
        stats = worker.pipeline.stats
        assert stats.dual_written["v3"] == 10
        assert await Reembed(settings, "v3", progress=False).drop() == "reembed_v3"
        await env.wait_for_offsets(await env.produce([event(i) for i in range(10, 30)]))
        await writing_into(worker, None)
        assert stats.dual_left[("v3", "write")] > 0
        await env.wait_for_offsets(await env.produce([event(i) for i in range(30, 40)]))
        assert worker.pipeline.fatal is None
    assert set(await table(env, "embeddings")) == {f"doc-{i}" for i in range(40)}


async def test_with_the_analysis_its_state_and_the_target_join_one_transaction(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, OLD)
    topics = {
        "classifications_topic": env.dlq.replace(".dlq", ".classifications"),
        "anomalies_topic": env.dlq.replace(".dlq", ".anomalies"),
    }
    await env.stack.create_topics(list(topics.values()), partitions=1)
    anomaly = {"warm_up": 5, "horizon": 5, "emit": "all"}
    analysis = {"namespaces": {"default": {"anomaly": anomaly}}, **topics}
    settings = dual_settings(env, fake_api, analysis=analysis)
    await Reembed(settings, "v3", progress=False).start(TARGET)
    async with running(settings) as worker:
        await writing_into(worker, "v3")
        await env.wait_for_offsets(await env.produce([event(i) for i in range(12)]))
        assert worker.pipeline is not None
        assert worker.pipeline.stats.dual_written["v3"] == 12
    conn = await env.connect()
    try:
        points = await conn.fetchval("SELECT count(*) FROM analysis_points")
    finally:
        await conn.close()
    assert points == 12
    assert set(await table(env, "reembed_v3")) == {f"doc-{i}" for i in range(12)}
