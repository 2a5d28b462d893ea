-- Re-embeds (worker/tools/reembed.py, docs/reembed.md): one row per target, a second
-- provider configuration filled beside the current table `embeddings` in its own table
-- (`reembed_<name>`, created by `reembed start` like `embeddings`, with the target's vector
-- dimension and a CHECK that admits only the target's model and dimension).
--   provider: the target's provider settings (no API key), as `reembed start` was given them.
--   state:    filling (start runs, or was interrupted: the next start resumes), switched (the
--             target is `embeddings` now; the table before is `embeddings_before_<name>`),
--             dropped (the table before, or an abandoned target's table, is gone).
--   cursor:   the primary key of the last row of `embeddings` the current pass stored, in the
--             transaction of its rows (NULL: a pass starts from the first key).
--   passes:   complete passes over `embeddings` (the fill, then each catch-up).
--   job:      `start --via batch`: the page's batch job, {"after": the cursor it starts
--             after, "lines": {custom_id: [[key..., content hash hex], ...]}, "file_id",
--             "batch_id"}, each id recorded as the provider answers, cleared in the
--             transaction of the page's rows (a killed start resumes the job, never submits
--             it twice).
CREATE TABLE reembed_targets (
    name        text        PRIMARY KEY,
    provider    jsonb       NOT NULL,
    model       text        NOT NULL,
    dimension   integer     NOT NULL,
    state       text        NOT NULL DEFAULT 'filling'
                CHECK (state IN ('filling', 'switched', 'dropped')),
    cursor      jsonb,
    passes      integer     NOT NULL DEFAULT 0,
    job         jsonb,
    embedded    bigint      NOT NULL DEFAULT 0,
    copied      bigint      NOT NULL DEFAULT 0,
    tokens      bigint      NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    switched_at timestamptz
);

-- Rows the target's provider refused for good (dead-lettered with reason provider_rejected):
-- left out of the target, and not sent again while their content is the same.
CREATE TABLE reembed_refused (
    target       text  NOT NULL REFERENCES reembed_targets (name) ON DELETE CASCADE,
    key          jsonb NOT NULL,
    content_hash bytea NOT NULL,
    PRIMARY KEY (target, key)
);
