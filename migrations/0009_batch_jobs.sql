-- Backfills through the provider's batch interface (worker/tools/backfill.py,
-- docs/backfill.md): one row per job, so that a job that outlives the process is picked up
-- again after a restart and never submitted twice.
--   group_id, topic: whose offsets the job's rows are stored with (consumer_offsets).
--   ranges:   {"<partition>": [first, end]}: the records the job covers (end excluded).
--   lines:    {"<custom_id>": [[partition, offset], ...]}: the records each line embeds.
--   file_id:  the uploaded input file (NULL until the upload answered).
--   batch_id: the provider's batch (NULL until its creation answered).
--   status:   uploading, submitted, stored (its rows and offsets committed, in the same
--             transaction as this status).
--   round:    the submission: lines that failed for a transient cause (a 500, the job's
--             window expired) are submitted again, alone, in the next round; the rows of
--             the round before are stored by then (without offsets), and lines, file_id and
--             batch_id are the new round's.
--   batch_tokens:    tokens the provider billed at the batch price (every round).
--   realtime_tokens: tokens (estimated) of the lines embedded again in real time.
CREATE TABLE batch_jobs (
    id              bigserial   PRIMARY KEY,
    group_id        text        NOT NULL,
    topic           text        NOT NULL,
    ranges          jsonb       NOT NULL,
    lines           jsonb       NOT NULL,
    file_id         text,
    batch_id        text,
    status          text        NOT NULL DEFAULT 'uploading'
                    CHECK (status IN ('uploading', 'submitted', 'stored')),
    round           integer     NOT NULL DEFAULT 1,
    batch_tokens    bigint      NOT NULL DEFAULT 0,
    realtime_tokens bigint      NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    submitted_at    timestamptz,
    stored_at       timestamptz
);

-- One open job per group and topic: a second backfill finds it instead of starting another.
CREATE UNIQUE INDEX batch_jobs_open ON batch_jobs (group_id, topic) WHERE status <> 'stored';
