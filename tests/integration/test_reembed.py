"""``embedding-worker reembed`` on the embedded stack (broker, Postgres, the fake provider):
a target filled beside ``embeddings`` while the worker indexes, changes caught up, the
switch in one step, a killed start resumed without embedding anything twice, and the guard."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import asyncpg
import numpy as np
import pytest

from fakeapi import FakeEmbeddingServer, fake_vector
from tests.conftest import API_KEY, Env, dashscope, migrate_db, running, wait_until
from tests.processes import cli, command
from worker.config import Settings, environment_for
from worker.read import index
from worker.sinks import postgres as pg
from worker.tools.reembed import Reembed, SwitchRefused, status

OLD, NEW = 64, 128
TARGET = {"model": "text-embedding-v3", "dimension": NEW}
POISON = "FORBIDDEN"


def event(i: int, text: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": f"doc-{i}", "text": text or f"document {i} about topic {i % 7}", **extra}


async def table(env: Env, name: str) -> dict[str, dict[str, Any]]:
    conn = await env.connect()
    try:
        found = await conn.fetch(f"SELECT * FROM {name}")
    finally:
        await conn.close()
    return {r["id"]: dict(r) for r in found}


async def target_row(env: Env, name: str = "v3") -> dict[str, Any]:
    conn = await env.connect()
    try:
        row = await conn.fetchrow("SELECT * FROM reembed_targets WHERE name = $1", name)
    finally:
        await conn.close()
    return {} if row is None else dict(row)


def cli_env(env: Env, fake: FakeEmbeddingServer, dimension: int = OLD) -> dict[str, str]:
    environ = environment_for(env.config(dashscope(fake, dimension)))
    return {**environ, "DASHSCOPE_API_KEY": API_KEY}


async def test_a_target_is_filled_beside_the_indexing_worker_and_switched_in_one_step(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, OLD)
    settings = env.settings(dashscope(fake_api, OLD))
    # The worker keeps running with the old settings through the switch: its first write
    # after it is refused by the guard, and it stops without storing it.
    with pytest.raises(asyncpg.DataError, match="expected 128 dimensions, not 64"):
        async with running(settings) as worker:
            late = await _fill_and_switch(env, fake_api, settings)

            async def stopped() -> bool:
                return worker.pipeline is not None and worker.pipeline.fatal is not None

            await wait_until(stopped, 30, "the old worker wrote into the target")
    stored = await env.stored_offsets()
    assert all(stored.get(p, 0) <= o for p, o in late.items())
    rows = await table(env, "embeddings")
    old = await table(env, "embeddings_before_v3")
    assert "doc-50" not in rows and "doc-50" not in old
    assert set(old) == {f"doc-{i}" for i in range(42)} - {"doc-3"}
    assert set(rows) == set(old) - {"doc-41"}  # refused: dead-lettered, left out
    for row in rows.values():
        assert (row["model"], row["dimension"]) == ("text-embedding-v3", NEW)
        assert np.allclose(row["embedding"].to_numpy(), fake_vector(row["content"], NEW), atol=1e-5)
        for column, value in old[row["id"]].items():
            if column not in ("embedding", "model", "dimension"):
                assert row[column] == value, (row["id"], column)
    assert rows["doc-1"]["content"] == "document 1, edited"
    assert rows["doc-2"]["metadata"] == '{"lang": "de"}'
    (letter,) = [x for x in await env.dead_letters(1) if x["id"] == "doc-41"]
    assert letter["reason"] == "provider_rejected" and "re-embed v3" in letter["message"]
    assert (await target_row(env))["state"] == "switched"

    # The guard: the switched table takes no row of another model, nor of another dimension.
    conn = await env.connect()
    try:
        await pg.check_schema(conn, NEW)
        built = await index.state(conn)
        assert built is not None and built.valid
        assert "ON public.embeddings USING hnsw" in built.definition
        assert "m='8'" in built.definition and "ef_construction='32'" in built.definition
        assert await index.state(conn, f"{index.NAME}_before_v3") is not None
        lexical = await index.state(conn, index.LEXICAL_NAME)
        assert lexical is not None and "ON public.embeddings USING gin" in lexical.definition
        assert await conn.fetchval(
            "SELECT count(*) FROM embeddings WHERE content_tsv = embeddings_lexical(content)"
        ) == len(rows)
        carried = await conn.fetch(
            "SELECT decided_id, content, embedding FROM label_vectors WHERE kind = 'decision' "
            "AND model = 'text-embedding-v3'"
        )
        assert sorted(r["decided_id"] for r in carried) == ["doc-5", "gone"]
        for r in carried:
            assert np.allclose(r["embedding"].to_numpy(), fake_vector(r["content"], NEW), atol=1e-5)
        assert (
            await conn.fetchval(
                "SELECT version FROM decision_state WHERE model = 'text-embedding-v3'"
            )
            == 1
        )
        for derived, column, before in (("label_vectors", "embedding", 3), ("profiles", "mean", 1)):
            assert (
                await conn.fetchval(
                    f"SELECT count(*) FROM {derived} WHERE model = 'text-embedding-v4'"
                )
                == 0
            )
            assert await conn.fetchval(f"SELECT count(*) FROM {derived}_before_v3") == before
            typmod = await conn.fetchval(
                "SELECT atttypmod FROM pg_attribute WHERE attrelid = $1::regclass AND attname = $2",
                derived,
                column,
            )
            assert typmod == NEW
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(
                "UPDATE embeddings SET model = 'text-embedding-v4' WHERE id = 'doc-0'"
            )
        with pytest.raises(pg.SchemaError, match="64-d"):
            await pg.check_schema(conn, OLD)
    finally:
        await conn.close()

    # The worker with the target's settings and search run on the switched table.
    new = env.settings(dashscope(fake_api, NEW, model="text-embedding-v3"))
    async with running(new):  # from the stored offsets: the event the old worker could not write
        await env.wait_for_offsets(late)
    assert (await table(env, "embeddings"))["doc-50"]["dimension"] == NEW
    environ = {
        **cli_env(env, fake_api, NEW),
        "EMBEDDING_WORKER_PROVIDER__MODEL": "text-embedding-v3",
    }
    code, out, err = await cli("search", "document 1, edited", "-k", "1", **environ)
    assert (code, out.split()[1:2]) == (0, ["default/doc-1"]), err
    code, out, _ = await cli("reembed", "status", "--json", **environ)
    (shown,) = [json.loads(line) for line in out.splitlines()]
    # 40 filled, then doc-1 (edited) and doc-40 embedded, doc-2 (metadata) copied.
    assert code == 0
    assert (shown["state"], shown["counts"], shown["embedded"], shown["copied"]) == (
        "switched",
        None,
        42,
        1,
    )
    code, out, _ = await cli("reembed", "drop", "v3", **environ)
    assert (code, out.strip()) == (0, "dropped embeddings_before_v3")
    for gone in ("embeddings_before_v3", "label_vectors_before_v3", "profiles_before_v3"):
        assert not await table_exists(env, gone)


async def _fill_and_switch(
    env: Env, fake_api: FakeEmbeddingServer, settings: Settings
) -> dict[int, int]:
    """Rows, a filled target, changes caught up by the switch; then an event produced for
    the worker (still on the old settings) to write after the switch."""
    await env.wait_for_offsets(await env.produce([event(i) for i in range(40)]))
    conn = await env.connect()
    try:
        await index.create(conn, OLD, 8, 32, None)  # built again on the target by the switch
        await index.create_lexical(conn)  # a generated column and its GIN: copied by LIKE
        # Analysis and profile rows of the old dimension: moved aside by the switch.
        vector = fake_vector("sports", OLD)
        await conn.execute(
            "INSERT INTO label_vectors (namespace, model, kind, label, text_hash, content, "
            "embedding) VALUES ('default', 'text-embedding-v4', 'description', 'sports', "
            "'\\x00', 'sports', $1)",
            vector,
        )
        # Moderation decisions: carried over to the target's model by the switch, one with
        # its event's vector in the target, one (its event gone) embedded.
        for decided, content in (("doc-5", "document 5 about topic 5"), ("gone", "a gone text")):
            await conn.execute(
                "INSERT INTO label_vectors (namespace, model, kind, label, text_hash, content, "
                "embedding, decided_id, decision_partition, decision_offset) VALUES "
                "('default', 'text-embedding-v4', 'decision', 'spam', '\\x01', $1, $2, $3, 0, 1)",
                content,
                fake_vector(content, OLD),
                decided,
            )
        await conn.execute(
            "INSERT INTO profiles (namespace, model, user_id, mean, weight, profile_time, "
            "interactions) VALUES ('default', 'text-embedding-v4', 'u1', $1, 1, now(), 1)",
            vector,
        )
    finally:
        await conn.close()
    job = Reembed(settings, "v3", page_rows=7, progress=False)
    report = await job.start(TARGET)
    assert (report.embedded, report.copied, report.refused) == (40, 0, 0)
    # Changes while the target waits: new content, a new version with the same content
    # (metadata), a delete, a new row, and one the target's provider refuses.
    changes = [
        event(1, "document 1, edited"),
        event(2, metadata={"lang": "de"}),
        {"id": "doc-3", "op": "delete"},
        event(40),
        event(41, f"a {POISON} text"),
    ]
    await env.wait_for_offsets(await env.produce(changes))
    fake_api.configure(poison=[POISON])
    (before,) = await status(settings, "v3")
    assert before.counts is not None and before.counts.pending == 5
    assert before.counts.current == 41 and before.counts.target == 40
    # Search answers from the current table all along.
    assert (await table(env, "embeddings"))["doc-0"]["dimension"] == OLD
    final = await Reembed(settings, "v3", page_rows=7, progress=False).switch(1000, 10)
    assert final.pending == 0
    return await env.produce([event(50)])


async def table_exists(env: Env, name: str) -> bool:
    conn = await env.connect()
    try:
        return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", name))
    finally:
        await conn.close()


async def test_a_killed_start_resumes_after_its_last_page_and_embeds_nothing_twice(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, OLD)
    settings = env.settings(dashscope(fake_api, OLD))
    async with running(settings):
        await env.wait_for_offsets(await env.produce([event(i) for i in range(120)]))
    fake_api.configure(latency_ms=100)
    environ = cli_env(env, fake_api)
    args = ["reembed", "start", "v3", "--model", "text-embedding-v3", "--dimension", str(NEW)]

    async def some_pages(rows: int) -> None:
        async def stored() -> bool:
            return int((await target_row(env)).get("embedded", 0)) >= rows

        await wait_until(stored, 60, "the re-embed stored no pages")

    # SIGTERM: the page under way is finished and stored, then the command exits.
    proc = await command(*args, "--page", "10", env=environ)
    try:
        await some_pages(10)
    finally:
        proc.send_signal(signal.SIGTERM)
    said, progress = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    assert "stopped; `reembed start` resumes it" in said.decode()
    # Not a terminal: plain progress lines, the last one when the pass stopped.
    assert "v3 pass 1 [" in progress.decode() and "/120" in progress.decode()
    stopped = await target_row(env)
    assert stopped["embedded"] == len(await table(env, "reembed_v3")) < 120
    # SIGKILL: whatever was under way is lost; what was stored stays, with its cursor.
    proc = await command(*args, "--page", "10", "--no-progress", quiet=True, env=environ)
    try:
        await some_pages(stopped["embedded"] + 20)
        fake_api.configure(latency_ms=60_000)  # its next request hangs: it runs still
        # One process per target: a second start is refused while this one runs.
        code, _, err = await cli(*args, **cli_env(env, fake_api))
        assert code == 1 and "in use by another process" in err
        code, out, _ = await cli("reembed", "status", "v3", **cli_env(env, fake_api))
        assert code == 0 and "a pass is under way" in out and "/120 rows" in out
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    killed = await target_row(env)
    stored = await table(env, "reembed_v3")
    # The checkpoint and the rows were one transaction: the cursor is the last row stored.
    assert killed["embedded"] == len(stored) < 120
    conn = await env.connect()
    try:
        upto = await conn.fetchval(
            "SELECT count(*) FROM embeddings e, reembed_targets t WHERE t.name = 'v3' "
            "AND (e.namespace, e.id) <= (t.cursor->>0, t.cursor->>1)"
        )
    finally:
        await conn.close()
    assert upto == len(stored)
    fake_api.configure(latency_ms=0)
    report = await Reembed(settings, "v3", progress=False).start({})
    assert report.embedded == 120 - len(stored)  # nothing stored before is embedded again
    assert (await target_row(env))["passes"] == 2
    rows = await table(env, "reembed_v3")
    assert len(rows) == 120
    for row in rows.values():
        assert np.allclose(row["embedding"].to_numpy(), fake_vector(row["content"], NEW), atol=1e-5)


async def test_configuration_errors_are_named(env: Env, fake_api: FakeEmbeddingServer) -> None:
    await migrate_db(env, OLD)
    # The current table's dimension does not match the configuration: refused as for `run`.
    code, _, err = await cli(
        "reembed", "start", "v3", "--dimension", "128", **cli_env(env, fake_api, 256)
    )
    assert code == 3 and "64-d" in err and "256-d" in err
    code, _, err = await cli("reembed", "start", "Bad-Name", **cli_env(env, fake_api))
    assert code == 2 and "target name 'Bad-Name'" in err
    code, _, err = await cli(
        "reembed", "start", "v3", "--dimension", "100", **cli_env(env, fake_api)
    )
    assert code == 2 and "provider.dimension 100" in err
    code, _, err = await cli("reembed", "switch", "nothing", **cli_env(env, fake_api))
    assert code == 2 and "does not exist" in err
    code, out, _ = await cli("reembed", "status", **cli_env(env, fake_api))
    assert (code, out.strip()) == (0, "no re-embed targets")


async def test_via_batch_a_killed_start_resumes_its_job_and_never_submits_it_twice(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, OLD)
    settings = env.settings(dashscope(fake_api, OLD))
    async with running(settings):
        await env.wait_for_offsets(
            await env.produce([event(i) for i in range(25)] + [event(25, f"a {POISON} text")])
        )
    fake_api.configure(batch_delay_s=3600.0, poison=[POISON])
    fake_api.reset_stats()
    environ = cli_env(env, fake_api)
    args = ["reembed", "start", "v3", "--model", "text-embedding-v3", "--dimension", str(NEW)]
    options = ["--via", "batch", "--poll-initial", "0.01", "--no-progress"]
    proc = await command(*args, *options, quiet=True, env=environ)
    try:

        async def submitted() -> bool:
            job = (await target_row(env)).get("job")
            return job is not None and '"batch_id": "' in job

        await wait_until(submitted, 60, "the batch job was never submitted")
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert fake_api.batch_stats()["created"] == 1
    assert await table(env, "reembed_v3") == {}
    fake_api.configure(batch_delay_s=0.0)
    job = Reembed(settings, "v3", progress=False, via="batch", poll_s=(0.01, 0.05))
    report = await job.start({})
    assert fake_api.batch_stats()["created"] == 1  # the job was resumed, not submitted again
    rows = await table(env, "reembed_v3")
    assert set(rows) == {f"doc-{i}" for i in range(25)}
    for row in rows.values():
        assert np.allclose(row["embedding"].to_numpy(), fake_vector(row["content"], NEW), atol=1e-5)
    # The poisoned text's line failed in the batch; its texts went in real time, where
    # bisection isolated it and dead-lettered it alone.
    assert (report.embedded, report.refused) == (25, 1)
    assert fake_api.stats()["requests"] > 0
    (letter,) = await env.dead_letters(1)
    assert (letter["id"], letter["reason"]) == ("doc-25", "provider_rejected")
    assert (await target_row(env))["job"] is None


async def test_a_switch_that_cannot_take_the_table_changes_nothing(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, OLD)
    settings = env.settings(dashscope(fake_api, OLD))
    async with running(settings):
        await env.wait_for_offsets(await env.produce([event(i) for i in range(5)]))
    await Reembed(settings, "v3", progress=False).start(TARGET)
    writer = await env.connect()
    try:
        async with writer.transaction():  # a write that does not end
            await writer.execute("LOCK TABLE embeddings IN ROW EXCLUSIVE MODE")
            with pytest.raises(SwitchRefused, match="could not take `embeddings`"):
                await Reembed(settings, "v3", progress=False).switch(1000, 0.2)
    finally:
        await writer.close()
    assert (await target_row(env))["state"] == "filling"
    assert (await table(env, "embeddings"))["doc-0"]["dimension"] == OLD
    final = await Reembed(settings, "v3", progress=False).switch(1000, 5)
    assert (final.target, final.pending) == (5, 0)
