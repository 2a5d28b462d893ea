"""Batch jobs of a backfill in Postgres (``batch_jobs``, migration 0009): what makes a job that
outlives the process resumable, and never submitted twice.

A job's row is written before its file is uploaded, and each answer of the provider (the
file's id, then the batch's) is recorded as soon as it arrives; the row turns ``stored`` in
the transaction that stores the job's rows and offsets. At most one job per group and topic
is open (a unique partial index), so a second backfill resumes it instead of starting one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from worker.sinks.postgres import Conn

# (partition, offset) of each record a line embeds, by custom_id.
Lines = dict[str, list[tuple[int, int]]]
# [first, end) offsets of each partition a job covers.
Ranges = dict[int, tuple[int, int]]


class JobTaken(Exception):
    """Another process stored this job first: this transaction must not commit."""


@dataclass
class Job:
    id: int
    group_id: str
    topic: str
    ranges: Ranges
    lines: Lines
    file_id: str | None
    batch_id: str | None
    status: str
    round: int = 1


async def open_job(conn: Conn, group_id: str, topic: str) -> Job | None:
    """The job of this group and topic not stored yet, if any."""
    row = await conn.fetchrow(
        "SELECT id, ranges, lines, file_id, batch_id, status, round FROM batch_jobs "
        "WHERE group_id = $1 AND topic = $2 AND status <> 'stored'",
        group_id,
        topic,
    )
    if row is None:
        return None
    ranges = {int(p): (int(r[0]), int(r[1])) for p, r in json.loads(row["ranges"]).items()}
    lines = {k: [(int(p), int(o)) for p, o in v] for k, v in json.loads(row["lines"]).items()}
    return Job(
        row["id"],
        group_id,
        topic,
        ranges,
        lines,
        row["file_id"],
        row["batch_id"],
        row["status"],
        row["round"],
    )


async def new_job(conn: Conn, group_id: str, topic: str, ranges: Ranges, lines: Lines) -> Job:
    """Record a job before anything is sent for it."""
    job_id = await conn.fetchval(
        "INSERT INTO batch_jobs (group_id, topic, ranges, lines) "
        "VALUES ($1, $2, $3::jsonb, $4::jsonb) RETURNING id",
        group_id,
        topic,
        json.dumps({str(p): list(r) for p, r in ranges.items()}),
        json.dumps(lines),
    )
    return Job(job_id, group_id, topic, ranges, lines, None, None, "uploading")


async def uploaded(conn: Conn, job: Job, file_id: str) -> None:
    await conn.execute("UPDATE batch_jobs SET file_id = $2 WHERE id = $1", job.id, file_id)
    job.file_id = file_id


async def submitted(conn: Conn, job: Job, batch_id: str) -> None:
    await conn.execute(
        "UPDATE batch_jobs SET batch_id = $2, status = 'submitted', submitted_at = now() "
        "WHERE id = $1",
        job.id,
        batch_id,
    )
    job.batch_id, job.status = batch_id, "submitted"


async def next_round(
    conn: Conn, job: Job, lines: Lines, batch_tokens: int, realtime_tokens: int
) -> None:
    """The lines to submit again, inside the transaction that stores the round's rows."""
    done = await conn.execute(
        "UPDATE batch_jobs SET lines = $2::jsonb, file_id = NULL, batch_id = NULL, "
        "status = 'uploading', round = round + 1, batch_tokens = batch_tokens + $3, "
        "realtime_tokens = realtime_tokens + $4 WHERE id = $1 AND status = 'submitted'",
        job.id,
        json.dumps(lines),
        batch_tokens,
        realtime_tokens,
    )
    _check(job, done)
    job.lines, job.file_id, job.batch_id = lines, None, None
    job.status, job.round = "uploading", job.round + 1


async def stored(conn: Conn, job: Job, batch_tokens: int, realtime_tokens: int) -> None:
    """Mark the job stored, inside the transaction of its rows and offsets."""
    done = await conn.execute(
        "UPDATE batch_jobs SET status = 'stored', stored_at = now(), "
        "batch_tokens = batch_tokens + $2, realtime_tokens = realtime_tokens + $3 "
        "WHERE id = $1 AND status = 'submitted'",
        job.id,
        batch_tokens,
        realtime_tokens,
    )
    _check(job, done)


def _check(job: Job, done: str) -> None:
    if done != "UPDATE 1":
        raise JobTaken(f"batch job {job.id} was stored by another process")
