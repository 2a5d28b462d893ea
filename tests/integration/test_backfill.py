"""``embedding-worker backfill`` on the embedded stack (broker, Postgres, the fake's batch
interface): rows and offsets exactly once, failed lines by the real-time rules, a job that
outlives its process resumed and never submitted twice."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import numpy as np
import pytest

from fakeapi import FakeEmbeddingServer, count_tokens, fake_vector
from tests.conftest import API_KEY, Env, dashscope, migrate_db, wait_until
from tests.integration.test_unreadable import BAD, Rec, produce_batch
from tests.processes import cli, command
from worker.config import environment_for
from worker.sinks import batchjobs
from worker.tools.backfill import Backfill, Report

DIM = 64
POISON = "FORBIDDEN"


def backfill(env: Env, fake: FakeEmbeddingServer, **options: Any) -> Backfill:
    settings = env.settings(dashscope(fake, DIM))
    defaults: dict[str, Any] = {
        "topic": env.topic,
        "group_id": f"{env.group}.backfill",
        "start_offset": None,
        "chunk_records": 1000,
        "poll_initial_s": 0.01,
        "poll_max_s": 0.05,
    }
    return Backfill(settings, **{**defaults, **options})


def event(i: int, text: str | None = None) -> dict[str, Any]:
    return {"id": f"doc-{i}", "text": text or f"document number {i} about topic {i % 7}"}


async def rows(env: Env) -> dict[str, tuple[str, np.ndarray]]:
    conn = await env.connect()
    try:
        found = await conn.fetch("SELECT id, content, embedding FROM embeddings")
    finally:
        await conn.close()
    return {r["id"]: (r["content"], r["embedding"].to_numpy()) for r in found}


async def stored_offsets(env: Env) -> dict[int, int]:
    conn = await env.connect()
    try:
        found = await conn.fetch(
            "SELECT partition, next_offset FROM consumer_offsets WHERE group_id = $1",
            f"{env.group}.backfill",
        )
    finally:
        await conn.close()
    return {r["partition"]: r["next_offset"] for r in found}


async def jobs(env: Env) -> list[dict[str, Any]]:
    conn = await env.connect()
    try:
        return [dict(r) for r in await conn.fetch("SELECT * FROM batch_jobs ORDER BY id")]
    finally:
        await conn.close()


def assert_vectors(found: dict[str, tuple[str, np.ndarray]]) -> None:
    for content, vector in found.values():
        assert np.allclose(vector, fake_vector(content, DIM), atol=1e-5), content


async def test_a_topic_is_stored_once_through_batches_with_bad_records_dead_lettered(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, DIM)
    fake_api.configure(poison=[POISON])
    events: list[Any] = [event(i) for i in range(60)]
    events += [b"{not json", event(60, f"a {POISON} text"), event(3, "document 3, edited")]
    events += [{"id": "doc-4", "op": "delete"}]
    high = await env.produce(events)

    report = await backfill(env, fake_api, chunk_records=25).run()

    found = await rows(env)
    assert set(found) == {f"doc-{i}" for i in range(60)} - {"doc-4"}
    assert found["doc-3"][0] == "document 3, edited"
    assert_vectors(found)
    assert await stored_offsets(env) == {p: h + 1 for p, h in high.items()}
    letters = await env.dead_letters(2)
    assert sorted(x["reason"] for x in letters) == ["invalid_json", "provider_rejected"]
    assert {x["id"] for x in letters if x["reason"] == "provider_rejected"} == {"doc-60"}
    # Every line obeyed the 10-texts limit; the poisoned line alone went in real time.
    assert fake_api.stats()["max_batch"] <= 10
    assert report.jobs == len(await jobs(env)) >= 3  # 64 records in chunks of 25
    assert {j["status"] for j in await jobs(env)} == {"stored"}
    assert report.records == len(events)
    # 59 upserts stand; doc-3's first version and doc-4's upsert are embedded too when a
    # chunk boundary falls between them and their next version (newest per key per chunk).
    assert 59 <= report.batch_texts + report.realtime_texts <= 61
    assert report.deletes == 1 and report.dead_letters == 2
    assert 0 < report.realtime_texts <= 9
    assert fake_api.stats()["requests"] > 0  # the poisoned line's bisection
    batch_tokens = fake_api.batch_stats()["tokens"]
    assert report.batch_tokens == batch_tokens
    assert sum(j["batch_tokens"] for j in await jobs(env)) == batch_tokens
    sent = [e["text"] for e in events if isinstance(e, dict) and e.get("text")]
    assert batch_tokens < sum(count_tokens(t) for t in sent)

    # Run again: nothing is left to read, nothing is submitted or written again.
    created = fake_api.batch_stats()["created"]
    again = await backfill(env, fake_api).run()
    assert again == Report()
    assert fake_api.batch_stats()["created"] == created


async def test_unchanged_content_is_not_embedded_again(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, DIM)
    await env.produce([event(i) for i in range(12)])
    await backfill(env, fake_api).run()
    await env.produce([event(i) for i in range(12)] + [event(12)])
    report = await backfill(env, fake_api, group_id=f"{env.group}.backfill").run()
    assert (report.records, report.unchanged, report.batch_texts) == (13, 12, 1)
    assert len(await rows(env)) == 13


@pytest.mark.parametrize(
    "fault", [{"batch_line_failure_rate": 0.5, "seed": 5}, {"batch_expire": True}]
)
async def test_lines_failed_for_a_transient_cause_go_again_then_in_real_time(
    env: Env, fake_api: FakeEmbeddingServer, fault: dict[str, Any]
) -> None:
    await migrate_db(env, DIM)
    high = await env.produce([event(i) for i in range(80)])
    fake_api.configure(**fault)
    report = await backfill(env, fake_api, rounds=3).run()
    found = await rows(env)
    assert len(found) == 80
    assert_vectors(found)
    assert fake_api.batch_stats()["created"] == report.jobs == 3  # one chunk, three rounds
    (job,) = await jobs(env)
    assert (job["round"], job["status"]) == (3, "stored")
    assert job["batch_tokens"] == report.batch_tokens == fake_api.batch_stats()["tokens"]
    assert report.batch_texts > 0 and report.realtime_texts > 0
    assert report.batch_texts + report.realtime_texts == 80
    assert job["realtime_tokens"] == report.realtime_tokens > 0
    assert await stored_offsets(env) == {p: h + 1 for p, h in high.items()}


async def test_a_restart_between_rounds_keeps_the_rows_of_the_round_before(
    env: Env, fake_api: FakeEmbeddingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    await migrate_db(env, DIM)
    high = await env.produce([event(i) for i in range(80)])
    fake_api.configure(batch_expire=True)  # each round runs half of its lines
    recorded = batchjobs.uploaded

    async def crash_in_round_2(conn: Any, job: batchjobs.Job, file_id: str) -> None:
        if job.round == 2:
            raise RuntimeError("the process dies after uploading round 2")
        await recorded(conn, job, file_id)

    monkeypatch.setattr(batchjobs, "uploaded", crash_in_round_2)
    with pytest.raises(RuntimeError, match="round 2"):
        await backfill(env, fake_api, rounds=3).run()
    (job,) = await jobs(env)
    assert (job["round"], job["status"], job["file_id"]) == (2, "uploading", None)
    first_round = await rows(env)
    assert 0 < len(first_round) < 80 and await stored_offsets(env) == {}

    monkeypatch.setattr(batchjobs, "uploaded", recorded)
    report = await backfill(env, fake_api, rounds=3).run()
    assert report.resumed == 1 and report.jobs == 2  # rounds 2 and 3, each once
    assert fake_api.batch_stats()["created"] == 3
    assert report.batch_texts + report.realtime_texts == 80 - len(first_round)
    found = await rows(env)
    assert len(found) == 80
    assert_vectors(found)
    assert await stored_offsets(env) == {p: h + 1 for p, h in high.items()}


async def test_a_job_outliving_its_process_is_resumed_and_never_submitted_twice(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, DIM)
    high = await env.produce([event(i) for i in range(30)])
    fake_api.configure(batch_delay_s=3600.0)
    first = asyncio.create_task(backfill(env, fake_api).run())

    async def submitted() -> bool:
        return any(j["status"] == "submitted" for j in await jobs(env))

    await wait_until(submitted, 30, "the job was never submitted")
    first.cancel()  # the process dies while the provider works
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await rows(env) == {} and await stored_offsets(env) == {}
    # As if it had died between the batch's creation and the recording of its id.
    conn = await env.connect()
    try:
        await conn.execute("UPDATE batch_jobs SET batch_id = NULL, status = 'uploading'")
    finally:
        await conn.close()

    fake_api.configure(batch_delay_s=0.0)
    report = await backfill(env, fake_api).run()
    assert report.resumed == 1 and report.jobs == 1
    assert fake_api.batch_stats()["created"] == 1
    (job,) = await jobs(env)
    assert job["status"] == "stored" and job["batch_id"]
    assert len(await rows(env)) == 30
    assert await stored_offsets(env) == {p: h + 1 for p, h in high.items()}


async def test_the_command_from_an_offset_reports_its_tokens(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, DIM)
    await env.produce([event(i) for i in range(40)])
    environ = environment_for(env.config(dashscope(fake_api, DIM)))
    environ["DASHSCOPE_API_KEY"] = API_KEY
    code, out, err = await cli(
        "backfill", "--from-offset", "5", "--poll-initial", "0.01", "--json", **environ
    )
    assert code == 0, err
    report = json.loads(out)
    stored = await rows(env)
    offsets = await stored_offsets(env)
    # Each of the 4 partitions skipped its first 5 offsets (those that had as many).
    assert report["records"] == len(stored) == sum(max(0, n - 5) for n in offsets.values())
    assert report["batch_tokens"] == fake_api.batch_stats()["tokens"] > 0
    code, out, _ = await cli("backfill", "--poll-initial", "0.01", **environ)
    assert code == 0 and out.startswith("0 records read")
    code, _, err = await cli("backfill", "--topic", f"{env.topic}.typo", **environ)
    assert code == 2 and "does not exist" in err


async def test_a_creation_whose_answer_was_lost_is_found_not_repeated(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, DIM)
    await env.produce([event(i) for i in range(15)])
    fake_api.configure(batch_drop_create_answers=1)
    report = await backfill(env, fake_api).run()
    assert fake_api.config.batch_drop_create_answers == 0  # the fault did happen
    assert fake_api.batch_stats()["created"] == report.jobs == 1
    assert len(await rows(env)) == 15


async def test_a_killed_command_is_resumed_by_the_next_run(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, DIM)
    high = await env.produce([event(i) for i in range(25)])
    environ = environment_for(env.config(dashscope(fake_api, DIM)))
    environ["DASHSCOPE_API_KEY"] = API_KEY
    fake_api.configure(batch_delay_s=3600.0)
    proc = await command("backfill", "--poll-initial", "0.01", quiet=True, env=environ)
    try:

        async def submitted() -> bool:
            return any(j["status"] == "submitted" for j in await jobs(env))

        await wait_until(submitted, 60, "the job was never submitted")
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert await rows(env) == {}

    fake_api.configure(batch_delay_s=0.0)
    code, out, err = await cli("backfill", "--poll-initial", "0.01", "--json", **environ)
    assert code == 0, err
    assert json.loads(out)["resumed"] == 1
    assert fake_api.batch_stats()["created"] == 1
    assert len(await rows(env)) == 25
    assert await stored_offsets(env) == {p: h + 1 for p, h in high.items()}


async def test_query_texts_go_the_real_time_way_which_sends_their_text_type(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, DIM)
    query = {"id": "q-1", "text": "which documents mention topic 3?", "text_type": "query"}
    await env.produce([event(i) for i in range(5)] + [query])
    report = await backfill(env, fake_api).run()
    assert (report.batch_texts, report.realtime_texts) == (5, 1)
    assert fake_api.stats()["by_dialect"] == {"native": 1}
    assert len(await rows(env)) == 6


async def test_a_record_the_client_cannot_parse_is_dead_lettered_and_the_rest_stored(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    """As in the worker (worker.kafka.unreadable): the unreadable record, and the one after
    it in its record batch, are dead-lettered with their position; everything else is
    stored once, and the backfill ends."""
    await migrate_db(env, DIM)
    good = [(f"doc-{i}", f"document number {i}") for i in range(12)]

    def rec(id: str, text: str) -> Rec:
        return (id.encode(), json.dumps({"id": id, "text": text}).encode(), ())

    offsets = await produce_batch(env, 0, [rec(*good[0]), rec(*good[1]), BAD, rec(*good[2])])
    later = await produce_batch(env, 0, [rec(*g) for g in good[3:8]])
    elsewhere = await produce_batch(env, 1, [rec(*g) for g in good[8:]])

    report = await backfill(env, fake_api, chunk_records=4).run()

    found = await rows(env)
    lost = {good[2][0]}  # after the unreadable record in its batch: the client cannot read it
    assert set(found) == {id for id, _ in good} - lost
    assert_vectors(found)
    assert await stored_offsets(env) == {0: later[-1] + 1, 1: elsewhere[-1] + 1}
    letters = await env.dead_letters(2)
    assert [(x["reason"], x["source"]["offset"]) for x in letters] == [
        ("unreadable_record", offsets[2]),
        ("unreadable_record", offsets[3]),
    ]
    assert report.dead_letters == 2


async def test_two_backfills_of_one_group_store_a_job_once_and_the_second_says_so(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    """Both resume the same job; the first to see it done stores it, the other's transaction
    is refused (JobTaken) and the command exits 1 with the reason, no traceback."""
    await migrate_db(env, DIM)
    high = await env.produce([event(i) for i in range(20)])
    fake_api.configure(batch_delay_s=3600.0)
    first = asyncio.create_task(backfill(env, fake_api).run())

    async def submitted() -> bool:
        return any(j["status"] == "submitted" for j in await jobs(env))

    await wait_until(submitted, 30, "the job was never submitted")
    environ = environment_for(env.config(dashscope(fake_api, DIM)))
    environ["DASHSCOPE_API_KEY"] = API_KEY
    second = await command("backfill", "--poll-initial", "3", "--poll-max", "3", env=environ)
    try:
        assert second.stdout is not None and second.stderr is not None
        seen = b""  # its log (stderr)
        while b"in_progress" not in seen:  # its first look, then 3 s of sleep
            line = await asyncio.wait_for(second.stderr.readline(), 60)
            assert line, f"the second backfill ended early: {seen.decode()}"
            seen += line
        fake_api.configure(batch_delay_s=0.0)
        report = await first  # polls every 10-50 ms: stores the job first
        out, rest = await asyncio.wait_for(second.communicate(), 60)
        err = seen + rest
    finally:
        if second.returncode is None:
            second.kill()
            await second.wait()
    assert report.resumed == 0 and report.jobs == 1
    assert second.returncode == 1, err
    message = err.decode()
    assert "was stored by another process" in message and "run it again" in message
    assert "Traceback" not in message + out.decode()
    (job,) = await jobs(env)
    assert job["status"] == "stored"
    assert len(await rows(env)) == 20
    assert await stored_offsets(env) == {p: h + 1 for p, h in high.items()}
    # Run again: nothing left.
    code, out2, err2 = await cli("backfill", "--json", **environ)
    assert code == 0 and json.loads(out2)["records"] == 0, err2


async def test_a_backfill_refuses_sparse_output_it_cannot_give(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, DIM)
    environ = environment_for(env.config(dashscope(fake_api, DIM)))
    environ["DASHSCOPE_API_KEY"] = API_KEY
    environ["EMBEDDING_WORKER_PROVIDER__OUTPUT_TYPE"] = "dense&sparse"
    code, _, err = await cli("backfill", **environ)
    assert code == 2 and "dense vectors only" in err and "provider.output_type" in err


async def test_a_backfill_stores_long_documents_as_chunks_like_the_worker(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    """oversize_policy = chunk: short texts through the batch, long ones chunked in real
    time, all chunks of a document stored together; a refused chunk dead-letters its
    document once and stores none of it."""
    await migrate_db(env, DIM)
    fake_api.configure(poison=[POISON])
    long_text = " ".join(f"Sentence {i} says something about subject {i % 5}." for i in range(12))
    poisoned = long_text + f" Then a {POISON} sentence. " + long_text
    high = await env.produce(
        [event(0), event(1, long_text), event(2, poisoned), event(3), event(1, long_text + " !")]
    )
    settings = env.settings(
        dashscope(fake_api, DIM),
        oversize_policy="chunk",
        chunking={"max_tokens": 48, "overlap_tokens": 8},
    )
    job = Backfill(
        settings,
        topic=env.topic,
        group_id=f"{env.group}.backfill",
        start_offset=None,
        chunk_records=1000,
        poll_initial_s=0.01,
        poll_max_s=0.05,
    )
    report = await job.run()
    assert report.dead_letters == 1 and report.batch_texts == 2  # doc-0 and doc-3
    conn = await env.connect()
    try:
        found = await conn.fetch(
            "SELECT id, chunk, content, embedding FROM embeddings ORDER BY id, chunk"
        )
    finally:
        await conn.close()
    by_id: dict[str, list[str]] = {}
    for r in found:
        by_id.setdefault(r["id"], []).append(r["content"])
        assert np.allclose(r["embedding"].to_numpy(), fake_vector(r["content"], DIM), atol=1e-5)
    assert sorted(by_id) == ["doc-0", "doc-1", "doc-3"]  # doc-2 dead-lettered, none of it
    assert [r["chunk"] for r in found if r["id"] == "doc-1"] == list(range(len(by_id["doc-1"])))
    assert len(by_id["doc-1"]) > 2 and by_id["doc-1"][-1].endswith("!")  # the newest version
    assert report.realtime_texts >= len(by_id["doc-1"])
    assert await stored_offsets(env) == {p: h + 1 for p, h in high.items()}
    (letter,) = await env.dead_letters(1)
    assert letter["reason"] == "provider_rejected" and letter["id"] == "doc-2"
