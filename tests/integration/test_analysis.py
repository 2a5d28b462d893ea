"""Classification, moderation and anomaly results on the embedded stack (local model)."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import generate_latest

from tests.conftest import Env, migrate_db, running
from worker.analysis import anomaly
from worker.analysis.config import Anomaly
from worker.analysis.results import AnomalyResult, ClassificationResult
from worker.config import Settings
from worker.sinks import postgres as store

LABELS = """
[namespaces.news.classify]
top_k = 2
policy = [
  { label = "Space", min_score = 0.5, action = "review" },
  { label = "Cooking", min_score = 0.6, action = "block" },
]

[[namespaces.news.classify.labels]]
name = "Sports"
description = "Sports: athletes, teams, matches, goals, championships and tournaments."
examples = ["The striker scored twice and the team won the cup final."]

[[namespaces.news.classify.labels]]
name = "Cooking"
description = "Cooking: recipes, ingredients, baking, kitchens and meals."
examples = ["Whisk the eggs with sugar, then fold in the flour and bake."]

[[namespaces.news.classify.labels]]
name = "Space"
description = "Space: rockets, astronauts, planets, telescopes and satellites."
examples = ["The rocket carried a new satellite into orbit around the Earth."]

[namespaces.logs.anomaly]
warm_up = 40
quantile = 0.98
horizon = 5
emit = "all"

[namespaces.ops.anomaly]
warm_up = 40
horizon = 5
emit = "all"

[namespaces.ops.anomaly.focus]
alert = "A failure that needs an operator: a component crashed, panicked or was terminated."
routine = "A routine message from normal operation: a status report or a configuration value."
"""

NEWS = [
    ("Sports", "The goalkeeper saved a penalty in the last minute of the match."),
    ("Sports", "She won the tennis tournament after three hard sets."),
    ("Sports", "The basketball team signed a new point guard for the season."),
    ("Cooking", "Simmer the tomatoes with garlic and basil for twenty minutes."),
    ("Cooking", "Knead the bread dough until it is smooth and let it rise."),
    ("Cooking", "This soup recipe needs onions, carrots and a little butter."),
    ("Space", "Astronauts docked with the space station after a two-day flight."),
    ("Space", "The telescope photographed a distant galaxy and its planets."),
    ("Space", "Engineers tested the rocket engine before the launch to Mars."),
]

OFF_TOPIC = [
    "My grandmother bakes the best chocolate cake with fresh cherries.",
    "The orchestra played a symphony by Beethoven to a full concert hall.",
    "Bright red tulips bloom in the garden every spring.",
]


def log_line(rng: random.Random) -> str:
    templates = [
        "user {a} logged in from 10.0.{b}.{c}",
        "disk usage on /dev/sda{b} at {a} percent",
        "request GET /api/items/{a} completed in {c} ms",
        "cache hit ratio {b}.{c} percent for shard {a}",
    ]
    return rng.choice(templates).format(
        a=rng.randint(1, 999), b=rng.randint(0, 9), c=rng.randint(0, 255)
    )


def analysis_file(tmp_path: Path) -> Path:
    path = tmp_path / "analysis.toml"
    path.write_text(LABELS)
    return path


async def single_partition(env: Env) -> None:
    """Point the test at a one-partition input topic: one stream order for every event."""
    env.topic = env.topic.replace(".events", ".stream")
    await env.stack.create_topics([env.topic], partitions=1)


async def topics_for(env: Env) -> dict[str, str]:
    names = {
        "classifications_topic": env.dlq.replace(".dlq", ".classifications"),
        "anomalies_topic": env.dlq.replace(".dlq", ".anomalies"),
    }
    await env.stack.create_topics(list(names.values()), partitions=1)
    return names


async def read_topic(env: Env, topic: str, expected: int, seconds: float = 60) -> list[Any]:
    """Every message of a one-partition topic as (key, JSON value), at least ``expected``."""
    consumer = AIOKafkaConsumer(bootstrap_servers=env.stack.bootstrap)
    await consumer.start()
    out: list[Any] = []
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        deadline = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(tp, timeout_ms=300)
            out += [(m.key.decode(), json.loads(m.value)) for m in batch.get(tp, [])]
            if len(out) >= expected and not batch:
                break
    finally:
        await consumer.stop()
    return out


async def one_stream(env: Env, tmp_path: Path) -> tuple[Settings, dict[str, str]]:
    """A migrated database, a one-partition input topic, the results topics, the analysis."""
    await migrate_db(env, 512)
    await single_partition(env)
    topics = await topics_for(env)
    return env.settings(analysis={"file": str(analysis_file(tmp_path)), **topics}), topics


def news_events() -> list[dict[str, Any]]:
    return [
        {"id": f"news-{i}", "text": text, "namespace": "news"} for i, (_, text) in enumerate(NEWS)
    ]


async def test_classification_messages_have_keys_schema_labels_and_actions(
    env: Env, tmp_path: Path
) -> None:
    await migrate_db(env, 512)
    topics = await topics_for(env)
    settings = env.settings(analysis={"file": str(analysis_file(tmp_path)), **topics})
    events = news_events()
    high = await env.produce(events)
    async with running(settings) as worker:
        await env.wait_for_offsets(high)
        scraped = generate_latest(worker.metrics.registry).decode()
    messages = await read_topic(env, topics["classifications_topic"], len(events))
    by_id = {m["id"]: (key, m) for key, m in messages}
    assert set(by_id) == {e["id"] for e in events}
    conn = await env.connect()
    try:
        hashes = {
            r["id"]: r["content_hash"].hex()
            for r in await conn.fetch("SELECT id, content_hash FROM embeddings")
        }
    finally:
        await conn.close()
    for i, (expected, _) in enumerate(NEWS):
        key, message = by_id[f"news-{i}"]
        result = ClassificationResult.model_validate(message)
        assert key == result.key == f"news/news-{i}#{hashes[f'news-{i}']}@use-multilingual-v3"
        assert result.label == expected, (NEWS[i], result.labels)
        assert result.method == "zero-shot+few-shot"
        assert len(result.labels) == 2
        assert result.labels[0].score >= result.labels[1].score
        top = result.labels[0].score
        if expected == "Space" and top >= 0.5:
            assert (result.action, result.rule) == ("review", "Space>=0.5")
        elif expected == "Cooking" and top >= 0.6:
            assert (result.action, result.rule) == ("block", "Cooking>=0.6")
        elif expected == "Sports":
            assert result.action == "allow" and result.rule is None
    actions = Counter(by_id[f"news-{i}"][1]["action"] for i in range(len(NEWS)))
    assert {"review", "block", "allow"} <= set(actions), "every action should occur in this data"
    for action, count in actions.items():
        assert f'embedding_worker_classifications_total{{action="{action}"}} {count}.0' in scraped


async def test_anomalies_flag_off_topic_text_after_warm_up_and_state_survives_restart(
    env: Env, tmp_path: Path
) -> None:
    settings, topics = await one_stream(env, tmp_path)
    rng = random.Random(7)
    first = [{"id": f"log-{i}", "text": log_line(rng), "namespace": "logs"} for i in range(120)]
    high = await env.produce(first)
    async with running(settings):
        await env.wait_for_offsets(high)
    scored = [
        AnomalyResult.model_validate(m)
        for _, m in await read_topic(env, topics["anomalies_topic"], len(first))
        if m["kind"] == "anomaly"
    ]
    assert [r.seen for r in scored] == list(range(120)), "one score per event, in stream order"
    assert all(r.warm_up and r.threshold is None and not r.anomaly for r in scored[:40])
    assert all(r.threshold is not None for r in scored[40:])

    # A restart keeps the learned state: no second warm-up, positions go on from 120.
    second = [
        {"id": f"log-{i}", "text": log_line(rng), "namespace": "logs"} for i in range(120, 200)
    ]
    odd = [{"id": f"odd-{i}", "text": t, "namespace": "logs"} for i, t in enumerate(OFF_TOPIC)]
    stream = second[:30] + odd[:1] + second[30:60] + odd[1:2] + second[60:] + odd[2:]
    high = await env.produce(stream)
    async with running(settings):
        await env.wait_for_offsets(high)
    later = [
        AnomalyResult.model_validate(m)
        for _, m in await read_topic(env, topics["anomalies_topic"], 120 + len(stream))
        if m["kind"] == "anomaly"
    ][120:]
    assert [r.seen for r in later] == list(range(120, 120 + len(stream)))
    assert not any(r.warm_up for r in later)
    flagged = {r.id for r in later if r.anomaly}
    assert {e["id"] for e in odd} <= flagged, [(r.id, r.score, r.threshold) for r in later]
    assert len(flagged - {e["id"] for e in odd}) <= 2, "few false alarms on routine lines"
    conn = await env.connect()
    try:
        seen = await conn.fetchval("SELECT seen FROM analysis_state WHERE namespace = 'logs'")
        points = await conn.fetchval("SELECT count(*) FROM analysis_points")
        histogram = await conn.fetchval("SELECT score_hist FROM analysis_state")
    finally:
        await conn.close()
    assert seen == points == 120 + len(stream), "each event counted once, across the restart"
    # Counted: the 40 warm-up events' seeds, then every later score, each fading by the
    # forgetting factor once per score counted after it.
    f = anomaly.forgetting(Anomaly())
    counted = 120 - 40 + len(stream)
    expected = 40 * f**counted + sum(f**k for k in range(counted))
    assert sum(histogram) == pytest.approx(expected)


async def test_a_focus_ranks_a_new_failure_above_new_routine_chatter(
    env: Env, tmp_path: Path
) -> None:
    settings, topics = await one_stream(env, tmp_path)
    rng = random.Random(11)
    routine = [log_line(rng) for _ in range(80)]
    failure = "kernel panic: the storage controller crashed and the node was terminated"
    chatter = "the dashboard colour theme is now blue for every user of the new office"
    texts = [*routine[:60], failure, *routine[60:70], chatter, *routine[70:]]
    events = [{"id": f"op-{i}", "text": t, "namespace": "ops"} for i, t in enumerate(texts)]
    high = await env.produce(events)
    async with running(settings):
        await env.wait_for_offsets(high)
    results = {
        r.id: r
        for r in (
            AnomalyResult.model_validate(m)
            for _, m in await read_topic(env, topics["anomalies_topic"], len(events))
            if m["kind"] == "anomaly"
        )
    }
    assert len(results) == len(events)
    bad, odd = results["op-60"], results["op-71"]
    for r in results.values():
        assert r.method == "centroid+knn*focus" and r.focus is not None
        assert r.score == pytest.approx(r.novelty * r.focus, abs=2e-6)
    assert bad.focus is not None and odd.focus is not None and bad.focus > odd.focus
    assert bad.anomaly, (bad.score, bad.threshold)
    assert bad.score > odd.score
    others = [r.score for r in results.values() if r.seen >= 40 and r.id not in ("op-60", "op-71")]
    assert bad.score > max(others), "the new failure ranks first"
    conn = await env.connect()
    try:
        focus_rows = await conn.fetch(
            "SELECT label FROM label_vectors WHERE namespace = 'ops' AND kind = 'focus'"
        )
    finally:
        await conn.close()
    assert sorted(r["label"] for r in focus_rows) == ["alert", "routine"]


async def test_results_are_not_lost_on_a_crash_between_produce_and_commit(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first write fails after its results were acknowledged: the worker stops with
    nothing stored; the restart produces the same results again under the same keys."""
    await migrate_db(env, 512)
    topics = await topics_for(env)
    settings = env.settings(analysis={"file": str(analysis_file(tmp_path)), **topics})
    events = news_events()
    high = await env.produce(events)
    real_write = store.write
    crashed = asyncio.Event()

    async def crash_once(*args: Any, **kwargs: Any) -> store.WriteResult:
        if not crashed.is_set():
            crashed.set()
            raise RuntimeError("simulated crash after the results were produced")
        return await real_write(*args, **kwargs)

    monkeypatch.setattr(store, "write", crash_once)
    with pytest.raises(RuntimeError, match="simulated crash"):
        async with running(settings):
            await asyncio.wait_for(crashed.wait(), 60)
            await asyncio.sleep(1)
    assert await env.stored_offsets() == {}
    before = await read_topic(env, topics["classifications_topic"], 1)
    assert before, "the crashed write's results had been produced"

    async with running(settings):
        await env.wait_for_offsets(high)
    after = await read_topic(env, topics["classifications_topic"], len(before) + len(events))
    keys = {key for key, _ in after}
    assert {m["id"] for _, m in after} == {e["id"] for e in events}, "none lost"
    assert len(keys) == len(events), "duplicates carry identical keys"
    labels: dict[str, set[str]] = {}
    for key, m in after:
        labels.setdefault(key, set()).add(m["label"])
    assert all(len(v) == 1 for v in labels.values()), "a replay gives the same answer"


async def test_results_as_cloudevents_carry_the_same_result_in_structured_mode(
    env: Env, tmp_path: Path
) -> None:
    """``analysis.results_format = "cloudevents"``: each message is a CloudEvent 1.0 in
    structured mode (the Kafka binding's content-type header), its ``data`` the result a
    JSON consumer would get, its ``id`` the result key (the same on a replay)."""
    await migrate_db(env, 512)
    topics = await topics_for(env)
    analysis = {"file": str(analysis_file(tmp_path)), "results_format": "cloudevents", **topics}
    events = news_events()
    high = await env.produce(events)
    async with running(env.settings(analysis=analysis)):
        await env.wait_for_offsets(high)
    consumer = AIOKafkaConsumer(bootstrap_servers=env.stack.bootstrap)
    await consumer.start()
    try:
        tp = TopicPartition(topics["classifications_topic"], 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        messages: list[Any] = []
        while len(messages) < len(events):
            batch = await asyncio.wait_for(consumer.getmany(tp, timeout_ms=300), 60)
            messages += batch.get(tp, [])
    finally:
        await consumer.stop()
    assert len(messages) == len(events)
    for m in messages:
        assert dict(m.headers)["content-type"] == b"application/cloudevents+json; charset=UTF-8"
        envelope = json.loads(m.value)
        result = ClassificationResult.model_validate(envelope["data"])
        assert envelope["specversion"] == "1.0"
        assert envelope["id"] == result.key == m.key.decode()
        assert envelope["source"] == "/embedding-worker/news"
        assert envelope["type"] == "io.github.embedding-worker.classification.v1"
        assert envelope["subject"] == result.id
        assert envelope["datacontenttype"] == "application/json"
        assert datetime.fromisoformat(envelope["time"]) == result.analysed_at
    assert {json.loads(m.value)["subject"] for m in messages} == {e["id"] for e in events}
