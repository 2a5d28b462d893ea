"""Anomaly incidents through the pipeline: real broker, real Postgres, the fake provider.

The fake provider's vector is a pure function of the text, random in 256 dimensions: a
handful of routine lines repeated are each other's neighbours, while every new text is far
from everything, so a burst of new texts is a burst of alerts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fakeapi import FakeEmbeddingServer
from tests.conftest import Env, dashscope, migrate_db, running
from tests.integration.test_analysis import read_topic, single_partition, topics_for
from worker.analysis.results import AnomalyResult, IncidentResult

ANALYSIS = """
[namespaces.ops.anomaly]
warm_up = 30
horizon = 5
neighbours = 5
incident_gap = 5
emit = "all"

[namespaces.pager.anomaly]
warm_up = 30
horizon = 5
neighbours = 5
incident_gap = 5
"""

ROUTINE = [
    "heartbeat ok from node a",
    "heartbeat ok from node b",
    "job finished with status 0",
    "cache refreshed",
]


def events(namespace: str, texts: list[str], start: int) -> list[dict[str, Any]]:
    return [
        {"id": f"{namespace}-{start + i}", "text": t, "namespace": namespace}
        for i, t in enumerate(texts)
    ]


def routine(n: int) -> list[str]:
    return [ROUTINE[i % len(ROUTINE)] for i in range(n)]


BURST = [f"storage controller {i} lost its connection and stopped" for i in range(8)]


async def test_a_burst_is_one_incident_and_a_restart_mid_incident_keeps_it(
    env: Env, tmp_path: Path, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, 256)
    await single_partition(env)
    topics = await topics_for(env)
    # Batches that finish out of order (small ones, each answered after 5-45 ms): the
    # analysis must still see each namespace in stream order (before the writer kept that
    # order, a later batch could be scored first and the burst's incident close early).
    fake_api.configure(latency_ms=5, latency_jitter_ms=40)
    path = tmp_path / "analysis.toml"
    path.write_text(ANALYSIS)
    settings = env.settings(
        dashscope(fake_api, 256), analysis={"file": str(path), **topics}, batch={"linger_ms": 0}
    )
    # Phase 1: warm-up and routine, then the first half of the burst; the worker stops
    # with the incident open.
    first = routine(50) + BURST[:4]
    # Phase 2 (after a restart): the rest of the burst, then routine long enough to close it.
    second = BURST[4:] + routine(20)
    for phase, texts, start in ((1, first, 0), (2, second, len(first))):
        high = await env.produce([e for ns in ("ops", "pager") for e in events(ns, texts, start)])
        async with running(settings):
            await env.wait_for_offsets(high)
        if phase == 1:
            conn = await env.connect()
            try:
                stored = await conn.fetch(
                    "SELECT namespace, first_position, count FROM anomaly_incidents"
                )
            finally:
                await conn.close()
            assert sorted((r["namespace"], r["first_position"]) for r in stored) == [
                ("ops", 50),
                ("pager", 50),
            ], "the open incident is in Postgres when the worker stops"

    total = 2 * len(first) + 4 + 2 * len(second)  # at least: scores of `ops`, incidents
    messages = [m for _, m in await read_topic(env, topics["anomalies_topic"], total)]
    scores = [
        AnomalyResult.model_validate(m)
        for m in messages
        if m["kind"] == "anomaly" and m["namespace"] == "ops"
    ]
    assert [s.seen for s in scores] == list(range(len(first) + len(second)))
    alerted = [s.seen for s in scores if s.anomaly]
    assert alerted and alerted[0] == 50 and all(50 <= p < 58 for p in alerted), alerted

    for namespace in ("ops", "pager"):
        mine = [m for m in messages if m["namespace"] == namespace]
        incidents = [IncidentResult.model_validate(m) for m in mine if m["kind"] == "incident"]
        assert {i.first.position for i in incidents} == {50}, "one incident for the burst"
        statuses = [i.status for i in incidents]
        assert statuses[0] == "open" and statuses[-1] == "closed", statuses
        assert set(statuses[1:-1]) <= {"update"}, "one page, one close, across the restart"
        opened, closed = incidents[0], incidents[-1]
        counts = [i.count for i in incidents]
        assert counts == sorted(counts), "updates only grow"
        assert opened.key == closed.key == f"{namespace}/incident-50@{settings.provider.model}"
        assert opened.count == 1 and opened.first.id == f"{namespace}-50"
        # The same scores in both namespaces, so the same alerts; the close counts them all,
        # those before the restart included.
        assert closed.count == len(alerted)
        assert closed.last.position == alerted[-1] >= 54, "the burst alerted after the restart"
        assert closed.closed_by == "events"
        assert closed.peak.score >= max(s.score for s in scores if s.anomaly) - 1e-6
    pager = [m["kind"] for m in messages if m["namespace"] == "pager"]
    assert set(pager) == {"incident"}, "emit = alerts sends incidents, not scores"

    conn = await env.connect()
    try:
        assert await conn.fetchval("SELECT count(*) FROM anomaly_incidents") == 0
    finally:
        await conn.close()
