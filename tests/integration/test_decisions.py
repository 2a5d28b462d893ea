"""Learning from moderation decisions on the embedded stack (local model, real broker and
Postgres): decisions become examples that change later classifications, bad ones are
dead-lettered with their reason, and each is applied once across crashes and restarts."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import generate_latest

from tests.conftest import Env, migrate_db, running, wait_until
from tests.integration.test_analysis import read_topic, single_partition, topics_for
from worker.analysis import decisions
from worker.config import Settings
from worker.events import TextType
from worker.kafka.clients import make_producer
from worker.model import Record
from worker.sinks import postgres as store

SPORTS = "Sports: athletes, teams, matches, goals, championships and tournaments."
COOKING = "Cooking: recipes, ingredients, baking, kitchens and meals."


def label_file(tmp_path: Path, namespaces: Iterable[str], extra_example: bool = True) -> Path:
    """Two labels that foresee no astronomy; ``logs`` scores anomalies only."""
    parts = []
    for ns in namespaces:
        cooking = ', "Knead the dough and let it rise."' if extra_example else ""
        parts.append(f"""
[[namespaces.{ns}.classify.labels]]
name = "Sports"
description = "{SPORTS}"
examples = ["The striker scored twice and the team won the cup final."]

[[namespaces.{ns}.classify.labels]]
name = "Cooking"
description = "{COOKING}"
examples = ["Whisk the eggs with sugar, then fold in the flour and bake."{cooking}]
""")
    parts.append("\n[namespaces.logs.anomaly]\nwarm_up = 5\nhorizon = 1\n")
    path = tmp_path / "analysis.toml"
    path.write_text("".join(parts))
    return path


ASTRONOMY = [
    "The telescope photographed a distant galaxy and its planets.",
    "Astronauts docked with the space station after a two-day flight.",
    "Engineers tested the rocket engine before the launch to Mars.",
    "A new comet will be visible in the night sky next week.",
    "The probe sent back images of the rings of Saturn.",
    "Scientists found water ice in a crater on the Moon.",
]
PROBES = [
    "The satellite entered orbit around Jupiter after a long journey.",
    "Astronomers discovered a planet circling a nearby star.",
    "The space agency announced a crewed mission to the Moon.",
]


async def setup(
    env: Env, tmp_path: Path, namespaces: Iterable[str] = ("news",), **analysis: Any
) -> tuple[Settings, dict[str, str], str, str]:
    """Migrated database, one-partition input and decisions topics, the settings."""
    kafka = analysis.pop("kafka", {})
    await migrate_db(env, 512)
    await single_partition(env)
    topics = await topics_for(env)
    decided = env.topic.replace(".stream", ".decisions")
    dlq = decided + ".dlq"
    await env.stack.create_topics([decided, dlq], partitions=1)
    settings = env.settings(
        analysis={
            "file": str(label_file(tmp_path, namespaces)),
            **topics,
            "decisions_topic": decided,
            "decisions_dlq_topic": dlq,
            "decisions_refresh_s": 0.5,
            **analysis,
        },
        kafka=kafka,
    )
    return settings, topics, decided, dlq


async def produce(env: Env, topic: str, values: Iterable[bytes | dict[str, Any]]) -> int:
    """Produce in order to ``topic`` (one partition); returns the offset after the last."""
    producer = make_producer(env.settings().kafka)
    await producer.start()
    try:
        last = -1
        for v in values:
            raw = json.dumps(v).encode() if isinstance(v, dict) else v
            key = v["id"].encode() if isinstance(v, dict) and isinstance(v.get("id"), str) else None
            last = (await (await producer.send(topic, key=key, value=raw))).offset
        return last + 1
    finally:
        await producer.stop()


async def decision_offset(env: Env, settings: Settings, topic: str) -> int:
    conn = await env.connect()
    try:
        group = f"{settings.kafka.group_id}.decisions"
        return (await store.load_offsets(conn, group, topic)).get(0, 0)
    finally:
        await conn.close()


async def wait_for_decisions(env: Env, settings: Settings, topic: str, end: int) -> None:
    async def done() -> bool:
        return await decision_offset(env, settings, topic) >= end

    await wait_until(done, 60, "the decisions were not all stored")


async def decision_rows(env: Env) -> dict[tuple[str, str], str]:
    conn = await env.connect()
    try:
        rows = await conn.fetch(
            "SELECT namespace, decided_id, label FROM label_vectors WHERE kind = 'decision'"
        )
    finally:
        await conn.close()
    return {(r["namespace"], r["decided_id"]): r["label"] for r in rows}


async def labels_of(env: Env, topic: str, ids: set[str], expected: int) -> dict[str, str]:
    messages = await read_topic(env, topic, expected)
    return {f"{m['namespace']}/{m['id']}": m["label"] for _, m in messages if m["id"] in ids}


async def test_decisions_teach_the_classifier_what_its_descriptions_missed(
    env: Env, tmp_path: Path
) -> None:
    """Astronomy fits neither label. Moderators decide six astronomy events belong to the
    label the classifier least gave them; new astronomy events then get that label in the
    namespace that learned, and not all of them do in an identical one that did not."""
    settings, topics, decided, _ = await setup(env, tmp_path, ("news", "control"))
    first = [
        {"id": f"a-{i}", "text": t, "namespace": ns}
        for ns in ("news", "control")
        for i, t in enumerate(ASTRONOMY)
    ]
    async with running(settings) as worker:
        await env.wait_for_offsets({0: await produce(env, env.topic, first) - 1})
        before = await labels_of(
            env, topics["classifications_topic"], {e["id"] for e in first}, len(first)
        )
        given = Counter(before[f"news/a-{i}"] for i in range(len(ASTRONOMY)))
        target = min(("Sports", "Cooking"), key=lambda label: given[label])
        end = await produce(
            env,
            decided,
            [{"id": f"a-{i}", "label": target, "namespace": "news"} for i in range(6)],
        )
        await wait_for_decisions(env, settings, decided, end)
        assert worker.learner is not None
        learner = worker.learner

        async def rebuilt() -> bool:
            return learner.stage.labels["news"].examples == 3 + 6

        await wait_until(rebuilt, 30, "the label set was not rebuilt with every decision")
        assert learner.stage.labels["control"].examples == 3
        probes = [
            {"id": f"p-{i}", "text": t, "namespace": ns}
            for ns in ("news", "control")
            for i, t in enumerate(PROBES)
        ]
        high = await produce(env, env.topic, probes) - 1
        await env.wait_for_offsets({0: high})
        scraped = generate_latest(worker.metrics.registry).decode()
    after = await labels_of(
        env, topics["classifications_topic"], {p["id"] for p in probes}, len(first) + len(probes)
    )
    learned = [after[f"news/p-{i}"] for i in range(len(PROBES))]
    control = [after[f"control/p-{i}"] for i in range(len(PROBES))]
    assert learned == [target] * len(PROBES), (target, given, learned, control)
    assert control != learned, "without the decisions the probes are not all given the target"
    assert await decision_rows(env) == {("news", f"a-{i}"): target for i in range(6)}
    assert "embedding_worker_decisions_applied_total 6.0" in scraped
    assert "embedding_worker_label_set_rebuilds_total" in scraped


async def test_bad_decisions_are_dead_lettered_with_their_reason_and_nothing_is_lost(
    env: Env, tmp_path: Path
) -> None:
    settings, _, decided, dlq = await setup(env, tmp_path, decisions_grace_s=0.5)
    events = [
        {"id": "e-0", "text": ASTRONOMY[0], "namespace": "news"},
        {"id": "e-1", "text": ASTRONOMY[1], "namespace": "news"},
    ]
    values: list[bytes | dict[str, Any]] = [
        {"id": "e-0", "label": "Sports", "namespace": "news"},  # good
        b"{not json",
        {"id": "e-0", "namespace": "news"},  # no label
        b"\xff\xfe",
        {"id": "e-0", "label": "Sports", "namespace": "elsewhere"},
        {"id": "e-0", "label": "Sports", "namespace": "logs"},  # anomaly only
        {"id": "e-0", "label": "Space", "namespace": "news"},
        {"id": "never-stored", "label": "Sports", "namespace": "news"},
        {"id": "e-1", "label": "Cooking", "namespace": "news"},  # its text removed below
    ]
    expected = {
        1: "invalid_json",
        2: "schema_violation",
        3: "invalid_utf8",
        4: "unknown_namespace",
        5: "unknown_namespace",
        6: "unknown_label",
        7: "unknown_id",
        8: "no_content",
    }
    async with running(settings) as worker:
        await env.wait_for_offsets({0: await produce(env, env.topic, events) - 1})
        conn = await env.connect()
        try:
            await conn.execute("UPDATE embeddings SET content = NULL WHERE id = 'e-1'")
        finally:
            await conn.close()
        end = await produce(env, decided, values)
        await wait_for_decisions(env, settings, decided, end)
        scraped = generate_latest(worker.metrics.registry).decode()
        ready = worker.checks()
    dead = Env(env.stack, env.dsn, "unused")
    dead.dlq = dlq
    letters = await dead.dead_letters(len(expected))
    assert {m["source"]["offset"]: m["reason"] for m in letters} == expected
    assert [m["source"]["offset"] for m in letters] == sorted(expected), "in decision order"
    assert all(m["source"]["topic"] == decided for m in letters)
    assert len(letters) == len(expected), "each bad decision once"
    assert await decision_rows(env) == {("news", "e-0"): "Sports"}
    assert await decision_offset(env, settings, decided) == len(values), "nothing left behind"
    for reason, count in Counter(expected.values()).items():
        line = f'embedding_worker_decisions_dead_lettered_total{{reason="{reason}"}} {count}.0'
        assert line in scraped
    assert ready["decisions_consuming"] and ready["decisions_polling"]


async def test_each_decision_is_applied_once_across_crashes_and_restarts(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after one commit, one before another, then a restart: every id has exactly
    one decision row, with the label of its last decision; sync at each start keeps them."""
    settings, _, decided, _ = await setup(env, tmp_path, kafka={"max_poll_records": 4})
    ids = [f"n-{i}" for i in range(10)]
    events = [
        {"id": i, "text": f"{ASTRONOMY[n % 6]} ({n})", "namespace": "news"}
        for n, i in enumerate(ids)
    ]
    labels = ("Sports", "Cooking")
    values = [
        {"id": i, "label": labels[(n + r) % 2], "namespace": "news"}
        for r in range(3)
        for n, i in enumerate(ids)
    ]
    final = {("news", i): labels[n % 2] for n, i in enumerate(ids)}
    real_apply = decisions.apply
    calls = 0

    async def crash_at(after: int, commit: bool) -> None:
        crashed = asyncio.Event()

        async def apply(*args: Any, **kwargs: Any) -> int:
            nonlocal calls
            calls += 1
            if calls == after:
                crashed.set()
                if commit:
                    await real_apply(*args, **kwargs)
                raise RuntimeError("simulated crash")
            return await real_apply(*args, **kwargs)

        monkeypatch.setattr(decisions, "apply", apply)
        with pytest.raises(RuntimeError, match="simulated crash"):
            async with running(settings):
                await asyncio.wait_for(crashed.wait(), 60)
                await asyncio.sleep(1)

    high = await produce(env, env.topic, events) - 1
    async with running(settings):
        await env.wait_for_offsets({0: high})
    end = await produce(env, decided, values)
    await crash_at(2, commit=True)
    first = await decision_offset(env, settings, decided)
    assert 0 < first < end
    calls = 0
    await crash_at(2, commit=False)
    monkeypatch.setattr(decisions, "apply", real_apply)
    # The restart's sync runs on a file without one example: it goes, the decisions stay.
    label_file(tmp_path, ["news"], extra_example=False)
    fields = ("file", "classifications_topic", "anomalies_topic", "decisions_topic")
    edited = env.settings(
        analysis=settings.analysis.model_dump(include={*fields, "decisions_dlq_topic"}),
        kafka={"max_poll_records": 4},
    )
    async with running(edited):
        await wait_for_decisions(env, settings, decided, end)
    assert await decision_offset(env, settings, decided) == end == len(values)
    rows = await decision_rows(env)
    assert len(rows) == len(set(ids)), "one decision row per decided id"
    assert rows == final, "the last decision of each id wins"
    conn = await env.connect()
    try:
        examples = await conn.fetchval(
            "SELECT count(*) FROM label_vectors WHERE kind = 'example' AND namespace = 'news'"
        )
    finally:
        await conn.close()
    assert examples == 2, "the example removed from the file is gone"


async def test_every_replica_learns_the_decisions_one_of_them_stored(
    env: Env, tmp_path: Path
) -> None:
    """Two workers share the database; the decisions topic has one partition, so one of them
    stores the decisions and the other learns them from the namespace's version."""
    settings, _, decided, _ = await setup(env, tmp_path)
    events = [{"id": f"a-{i}", "text": t, "namespace": "news"} for i, t in enumerate(ASTRONOMY)]
    high = await produce(env, env.topic, events) - 1
    async with running(settings) as one, running(settings) as two:

        async def both_running() -> bool:
            return all(w.learner is not None and w.learner.running for w in (one, two))

        await wait_until(both_running, 60, "a replica did not start its decisions loop")
        learners = [w.learner for w in (one, two) if w.learner is not None]
        await env.wait_for_offsets({0: high})
        assert all(learner.stage.labels["news"].examples == 3 for learner in learners)
        end = await produce(
            env, decided, [{"id": e["id"], "label": "Cooking", "namespace": "news"} for e in events]
        )
        await wait_for_decisions(env, settings, decided, end)

        async def both_learned() -> bool:
            return all(learner.stage.labels["news"].examples == 3 + 6 for learner in learners)

        await wait_until(both_learned, 30, "a replica did not rebuild its label set")
        assert sum(learner.stats.applied for learner in learners) == len(events), "stored once"
    assert await decision_rows(env) == {("news", e["id"]): "Cooking" for e in events}


async def test_a_withdrawn_decision_stops_counting_and_a_replay_does_not_restore_it(
    env: Env, tmp_path: Path
) -> None:
    """``"label": null`` withdraws an id's decision: the label set loses it, withdrawing an
    id never decided changes nothing, a later decision counts again, and the withdrawn
    decision read again from its old offset (a replay) stays withdrawn."""
    settings, _, decided, dlq = await setup(env, tmp_path)
    events = [{"id": f"a-{i}", "text": t, "namespace": "news"} for i, t in enumerate(ASTRONOMY)]
    high = await produce(env, env.topic, events) - 1
    async with running(settings) as worker:
        await env.wait_for_offsets({0: high})
        assert worker.learner is not None
        learner = worker.learner
        first = [{"id": f"a-{i}", "label": "Sports", "namespace": "news"} for i in range(3)]
        await wait_for_decisions(env, settings, decided, await produce(env, decided, first))
        withdrawals: list[bytes | dict[str, Any]] = [
            {"id": "a-0", "label": None, "namespace": "news"},
            {"id": "a-1", "label": None, "namespace": "news"},
            {"id": "a-5", "label": None, "namespace": "news"},  # never decided
            {"id": "a-1", "label": "Cooking", "namespace": "news"},
            {"id": "a-2", "label": None, "namespace": "elsewhere"},
        ]
        end = await produce(env, decided, withdrawals)
        await wait_for_decisions(env, settings, decided, end)

        async def rebuilt() -> bool:
            return learner.stage.labels["news"].examples == 3 + 2

        await wait_until(rebuilt, 30, "the label set still counts the withdrawn decision")
    conn = await env.connect()
    try:
        query = (
            "SELECT decided_id, label, withdrawn, decision_offset FROM label_vectors "
            "WHERE kind = 'decision' ORDER BY decided_id"
        )
        rows = [tuple(r) for r in await conn.fetch(query)]
        assert rows == [
            ("a-0", "Sports", True, 3),
            ("a-1", "Cooking", False, 6),
            ("a-2", "Sports", False, 2),
        ]
        # The withdrawn decision (offset 0) read again, as by a second owner in a rebalance.
        replay = decisions.Decided(
            Record(decided, 0, 0, b"a-0", b"{}", timestamp_ms=0), "news", "a-0", "Sports"
        )
        example = decisions.Example(replay, ASTRONOMY[0], TextType.DOCUMENT, np.ones(512))
        group = f"{settings.kafka.group_id}.decisions"
        changed = await decisions.apply(conn, [example], settings.provider.model_name, group, {})
        assert changed == 0
        assert tuple((await conn.fetch(query))[0]) == ("a-0", "Sports", True, 3)
    finally:
        await conn.close()
    dead = Env(env.stack, env.dsn, "unused")
    dead.dlq = dlq
    letters = await dead.dead_letters(1)
    assert [m["reason"] for m in letters] == ["unknown_namespace"]
