"""The command line as a user runs it: real subprocesses, clear errors, search on a filled DB."""

from __future__ import annotations

import argparse
import asyncio
import json
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Env, migrate_db, running, wait_until
from tests.processes import cli
from worker.cli import _parser, _where
from worker.config import environment_for
from worker.kafka.clients import read_topic


def _env(env: Env, **extra: str) -> dict[str, str]:
    return {
        "EMBEDDING_WORKER_POSTGRES__DSN": env.dsn,
        **environment_for({"kafka": env.stack.kafka_settings()}),
        "EMBEDDING_WORKER_KAFKA__INPUT_TOPIC": env.topic,
        "EMBEDDING_WORKER_KAFKA__DLQ_TOPIC": env.dlq,
        # Any free port: a worker started by hand (or another test run) may hold 8080.
        "EMBEDDING_WORKER_HTTP__PORT": "0",
        **extra,
    }


async def test_missing_api_key_fails_fast_with_the_variable_named(env: Env) -> None:
    code, _, err = await cli("run", **_env(env, EMBEDDING_WORKER_PROVIDER__KIND="dashscope"))
    assert code == 2
    assert "DASHSCOPE_API_KEY" in err


async def test_invalid_setting_names_its_variable(env: Env) -> None:
    code, _, err = await cli("run", **_env(env, EMBEDDING_WORKER_BATCH__LINGER_MS="soon"))
    assert code == 2
    assert "EMBEDDING_WORKER_BATCH__LINGER_MS" in err


async def test_unmigrated_database_is_a_clear_start_up_error(env: Env) -> None:
    code, _, err = await cli("run", **_env(env))
    assert code == 3
    assert "embedding-worker migrate" in err
    # The clients made before the check are closed: no "Unclosed AIOKafkaProducer" noise.
    assert "Unclosed" not in err and "Traceback" not in err, err


async def test_dimension_mismatch_is_a_clear_start_up_error(env: Env) -> None:
    await migrate_db(env, 256)
    code, _, err = await cli("run", **_env(env))  # the local model makes 512-d vectors
    assert code == 3
    assert "256-d" in err and "512-d" in err
    assert "Unclosed" not in err and "Traceback" not in err, err


async def test_migrate_command_is_idempotent(env: Env) -> None:
    code, out, _ = await cli("migrate", **_env(env))
    assert (code, out.splitlines()) == (
        0,
        [
            "applied 0001_embeddings.sql",
            "applied 0002_analysis.sql",
            "applied 0003_focus.sql",
            "applied 0004_decisions.sql",
            "applied 0005_incidents.sql",
            "applied 0006_lexical.sql",
            "applied 0007_profiles.sql",
            "applied 0008_sparse.sql",
            "applied 0009_batch_jobs.sql",
            "applied 0010_chunks.sql",
            "applied 0011_reembed.sql",
            "applied 0012_multimodal.sql",
            "applied 0013_withdrawn_decisions.sql",
        ],
    )
    code, out, _ = await cli("migrate", **_env(env))
    assert (code, out.strip()) == (0, "up to date")


DOCS: list[dict[str, Any]] = [
    {
        "id": "moon",
        "text": "The rocket lifted off towards the Moon with four astronauts.",
        "metadata": {"lang": "en"},
    },
    {
        "id": "mond",
        "text": "Die Rakete startete mit vier Astronauten zum Mond.",
        "metadata": {"lang": "de"},
    },
    {
        "id": "bread",
        "text": "Knead the dough, let it rise overnight and bake the bread.",
        "metadata": {"lang": "en"},
    },
    {
        "id": "rates",
        "text": "The central bank raised interest rates to fight inflation.",
        "metadata": {"lang": "en"},
    },
    {
        "id": "pan",
        "text": "Amasa la masa, déjala reposar y hornea el pan por la mañana.",
        "metadata": {"lang": "es"},
    },
]


async def test_local_model_end_to_end_and_search_command(env: Env) -> None:
    """The default provider, for real: then `search` against the database it filled."""
    await migrate_db(env, 512)
    high = await env.produce(DOCS)
    async with running(env.settings()):
        await env.wait_for_offsets(high)

    code, out, err = await cli("search", "launch of a spacecraft", "-k", "2", "--json", **_env(env))
    assert code == 0, err
    hits = [json.loads(line) for line in out.splitlines()]
    assert {h["id"] for h in hits} == {"moon", "mond"}
    assert hits[0]["score"] >= hits[1]["score"]

    code, out, err = await cli(
        "search", "how to bake bread", "-k", "1", "--where", "lang=es", "--json", **_env(env)
    )
    assert code == 0, err
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["pan"]


async def test_dead_letters_are_listed_then_replayed_once_the_limit_is_fixed(env: Env) -> None:
    """The operator's loop: see why events were dead-lettered, fix the setting, replay them."""
    await migrate_db(env, 512)
    big = {
        "id": "big",
        "text": "A ticket with a long list of attachments.",
        "metadata": {"files": [f"scan-{i:03}.pdf" for i in range(100)]},
    }
    fine = {"id": "fine", "text": "An ordinary ticket about a late delivery."}
    high = await env.produce([big, b"{not json", fine])
    async with running(env.settings(max_metadata_bytes=1000)):
        await env.wait_for_offsets(high)

    code, out, err = await cli("dead-letters", **_env(env))
    assert code == 0, err
    assert f"{env.dlq}: 2 letters, 2 matching (invalid_json: 1, metadata_too_large: 1)" in out
    code, out, err = await cli(
        "dead-letters", "--reason", "metadata_too_large", "--json", **_env(env)
    )
    assert code == 0, err
    [letter] = [json.loads(line) for line in out.splitlines()]
    assert (letter["reason"], letter["id"], letter["dlq_partition"]) == (
        "metadata_too_large",
        "big",
        0,
    )

    code, out, err = await cli(
        "dead-letters", "--reason", "metadata_too_large", "--replay", **_env(env)
    )
    assert code == 0, err
    assert f"replayed 1 events to {env.topic}" in out
    async with running(env.settings()):  # the default limit (64 kB) takes it

        async def stored() -> bool:
            conn = await env.connect()
            try:
                return bool(await conn.fetchval("SELECT count(*) FROM embeddings WHERE id = 'big'"))
            finally:
                await conn.close()

        await wait_until(stored, 60, "the replayed event was not stored")
    conn = await env.connect()
    try:
        ids = sorted(r["id"] for r in await conn.fetch("SELECT id FROM embeddings"))
    finally:
        await conn.close()
    assert ids == ["big", "fine"]
    assert len(await env.dead_letters(2)) == 2, "the invalid JSON was not replayed"


async def test_a_replay_does_not_roll_back_a_version_stored_since(env: Env) -> None:
    """The letter's event is older than the version stored after it: replaying it once the
    cause is fixed must leave the newer version in place (the record keeps its timestamp)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    await migrate_db(env, 512)
    old = {
        "id": "doc",
        "text": "The first version, with too much metadata.",
        "metadata": {"files": [f"scan-{i:03}.pdf" for i in range(100)]},
    }
    await env.produce([old])
    await asyncio.sleep(0.05)  # a later record time for the newer version
    high = await env.produce([{"id": "doc", "text": "The second version."}])
    async with running(env.settings(max_metadata_bytes=1000)):
        await env.wait_for_offsets(high)
    code, out, err = await cli("dead-letters", "--replay", **_env(env))
    assert code == 0, err
    assert f"replayed 1 events to {env.topic}" in out

    [(partition, newer)] = high.items()  # one key, one partition
    consumer = AIOKafkaConsumer(bootstrap_servers=env.stack.bootstrap)
    await consumer.start()
    try:
        tp = TopicPartition(env.topic, partition)
        assert (await consumer.end_offsets([tp]))[tp] == newer + 2, "nothing was replayed"
    finally:
        await consumer.stop()
    async with running(env.settings()):  # the default limit would take the old version
        await env.wait_for_offsets({partition: newer + 1})
    conn = await env.connect()
    try:
        row = await conn.fetchrow(
            "SELECT source_offset, metadata::text FROM embeddings WHERE id = 'doc'"
        )
    finally:
        await conn.close()
    assert row is not None
    assert tuple(row) == (newer, "{}"), "the replayed old version overwrote the newer one"


@pytest.mark.parametrize("args", [["--help"], ["search", "--help"]])
async def test_help(args: list[str]) -> None:
    code, out, _ = await cli(*args)
    assert code == 0 and "usage" in out


def _commands() -> dict[str, argparse.ArgumentParser]:
    [sub] = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _help(command: str) -> str:
    out = StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        _parser().parse_args([command, "--help"])
    return " ".join(out.getvalue().split())  # argparse wraps lines where it likes


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_command_help_shows_its_defaults(command: str) -> None:
    text = _help(command)
    for action in _commands()[command]._actions:
        default = action.default
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        if default is None or default is False or default == [] or default == argparse.SUPPRESS:
            continue
        assert f"(default: {default})" in text, (command, action.dest)
    assert "--config FILE" in text  # accepted after the command too


@pytest.mark.parametrize(
    ("command", "formats"),
    [
        ("produce", ["JSON Lines", '{"id": "a-1", "text": "Hello"']),
        ("evaluate", ["JSON Lines", "`text` and `label`"]),
        ("dead-letters", ["ISO 8601"]),
        ("search", ["as JSON when it is JSON", "else as a string"]),
        ("similar", ["as JSON when it is JSON", "else as a string"]),
        ("recommend", ["as JSON when it is JSON", "docs/recommend.md"]),
    ],
)
def test_help_describes_input_formats(command: str, formats: list[str]) -> None:
    text = _help(command)
    for part in formats:
        assert part in text, part


@pytest.mark.parametrize(
    "args",
    [
        ["search", "q", "-k", "0"],
        ["search", "q", "-k", "-3"],
        ["search", "q", "-k", "many"],
        ["similar", "some-id", "-k", "0"],
        ["recommend", "--user", "u", "-k", "0"],
        ["recommend", "--history", " , "],
        ["cluster", "-k", "-1"],
        ["cluster", "--members", "-1"],
        ["cluster", "--sample", "0"],
        ["dead-letters", "--limit", "-5"],
        ["evaluate", "rows.jsonl", "--shots", "-1"],
        ["evaluate", "rows.jsonl", "--limit", "0"],
        ["evaluate", "rows.jsonl", "--limit", "-1"],
        ["search", "q", "--where", "lang"],
        ["search", "q", "--where", "=en"],
    ],
)
async def test_bad_arguments_are_refused_before_any_work(args: list[str]) -> None:
    code, out, err = await cli(*args)
    assert code == 2 and out == ""
    assert "error: argument" in err and "Traceback" not in err
    assert "must be at least" in err or "expected" in err


@pytest.mark.parametrize(
    ("pair", "typed"),
    [
        ("lang=en", "en"),
        ("year=2024", 2024),
        ("score=0.5", 0.5),
        ("draft=false", False),
        ("note=null", None),
        ('code="2024"', "2024"),
        ('tags=["a"]', ["a"]),
        ("url=a=b", "a=b"),
        ("empty=", ""),
        # Python's json reads these, Postgres' jsonb would refuse them: kept as text.
        ("score=NaN", "NaN"),
        ("score=1e400", "1e400"),
    ],
)
def test_where_values_are_json_when_they_are_json_else_strings(pair: str, typed: Any) -> None:
    key, value = _where(pair)
    assert (key, value) == (pair.partition("=")[0], typed)
    assert type(value) is type(typed)


def _config_file(env: Env, path: Path) -> Path:
    """The topic and broker from a TOML file instead of the environment."""
    kafka = {**env.stack.kafka_settings(), "input_topic": env.topic}
    path.write_text("[kafka]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in kafka.items()))
    return path


async def _input_values(env: Env) -> list[bytes]:
    values: list[bytes] = []
    for partition in range(4):
        values += await read_topic(env.stack.bootstrap, env.topic, partition)
    return values


EVENTS = [{"id": "p-1", "text": "first"}, {"id": "p-2", "text": "second", "metadata": {"n": 1}}]


async def test_produce_takes_config_before_or_after_the_command(env: Env, tmp_path: Path) -> None:
    config = _config_file(env, tmp_path / "w.toml")
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(json.dumps(e) for e in EVENTS) + "\n\n")
    for args in (
        ["--config", str(config), "produce", str(events)],
        ["produce", str(events), "--config", str(config)],
    ):
        code, out, err = await cli(*args)
        assert (code, out.strip()) == (0, f"produced 2 events to {env.topic}"), err
    assert len(await _input_values(env)) == 4


@pytest.mark.parametrize(
    ("lines", "named"),
    [
        (
            ['{"id": "ok", "text": "fine"}', "not json", "[1, 2]", '{"text": "no id"}'],
            ["line 2: invalid_json", "line 3: schema_violation", "line 4: schema_violation"],
        ),
        (
            ['{"id": "ok", "text": "fine"}', "", '{"id": "blank", "text": "  "}'],
            ["line 3: empty_text"],
        ),
        (['{"id": "nan", "text": "x", "metadata": {"score": NaN}}'], ["line 1: invalid_json"]),
    ],
)
async def test_produce_refuses_a_file_with_lines_that_are_not_events(
    env: Env, tmp_path: Path, lines: list[str], named: list[str]
) -> None:
    """Nothing is sent, and every bad line is named with the reason the worker would give."""
    config = _config_file(env, tmp_path / "w.toml")
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, out, err = await cli("produce", str(path), "--config", str(config))
    assert code == 2 and out == ""
    assert "nothing produced" in err and "Traceback" not in err
    for part in named:
        assert part in err
    assert len([line for line in err.splitlines() if line.startswith("  line ")]) == len(named)
    assert await _input_values(env) == []

    code, out, err = await cli("produce", str(path), "--allow-invalid", "--config", str(config))
    sent = [line for line in lines if line.strip()]
    assert code == 0, err
    assert out.strip() == (
        f"produced {len(sent) - len(named)} events to {env.topic}, "
        f"and {len(named)} invalid lines (the worker dead-letters them)"
    )
    assert sorted(await _input_values(env)) == sorted(line.encode() for line in sent)


@pytest.mark.parametrize("missing", ["nowhere.jsonl", "."])
async def test_produce_an_unreadable_file_is_a_clear_error(tmp_path: Path, missing: str) -> None:
    code, out, err = await cli("produce", str(tmp_path / missing))
    assert code == 2 and out == ""
    assert f"cannot read {tmp_path / missing}" in err and "Traceback" not in err
