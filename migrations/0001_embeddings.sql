-- Vectors, one row per (namespace, id), plus the consumer offsets that are written in the
-- same transaction (exactly-once into Postgres) and the tombstones that stop an older
-- upsert from resurrecting a newer delete. {{dimension}} is the configured vector dimension.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE embeddings (
    namespace        text        NOT NULL,
    id               text        NOT NULL,
    embedding        vector({{dimension}}) NOT NULL,
    content          text,
    content_hash     bytea       NOT NULL,
    text_type        text        NOT NULL DEFAULT 'document',
    model            text        NOT NULL,
    dimension        integer     NOT NULL,
    metadata         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    truncated        boolean     NOT NULL DEFAULT false,
    source_topic     text        NOT NULL,
    source_partition integer     NOT NULL,
    source_offset    bigint      NOT NULL,
    event_time       timestamptz NOT NULL,
    version          bigint      NOT NULL DEFAULT 1,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, id)
);

CREATE INDEX embeddings_metadata_idx ON embeddings USING gin (metadata jsonb_path_ops);

CREATE TABLE embedding_tombstones (
    namespace     text        NOT NULL,
    id            text        NOT NULL,
    event_time    timestamptz NOT NULL,
    source_offset bigint      NOT NULL,
    deleted_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, id)
);

CREATE TABLE consumer_offsets (
    group_id    text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);
