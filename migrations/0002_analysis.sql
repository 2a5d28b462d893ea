-- Analysis state. label_vectors: each label set's descriptions and examples, embedded once
-- and content-addressed. anomaly_state: per namespace and model, additive sums (events
-- scored, normal events, centroid sum, score histogram) that replicas add to. anomaly_points:
-- the recent events the k-NN anomaly score compares with, by position in the namespace.
CREATE TABLE label_vectors (
    namespace  text        NOT NULL,
    model      text        NOT NULL,
    kind       text        NOT NULL CHECK (kind IN ('description', 'example')),
    label      text        NOT NULL,
    text_hash  bytea       NOT NULL,
    content    text        NOT NULL,
    embedding  vector({{dimension}}) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, model, kind, label, text_hash)
);

CREATE TABLE anomaly_state (
    namespace    text               NOT NULL,
    model        text               NOT NULL,
    scored       bigint             NOT NULL,
    normal       bigint             NOT NULL,
    centroid_sum double precision[] NOT NULL,
    score_hist   double precision[] NOT NULL,
    updated_at   timestamptz        NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, model)
);

CREATE TABLE anomaly_points (
    namespace text        NOT NULL,
    model     text        NOT NULL,
    position  bigint      NOT NULL,
    id        text        NOT NULL,
    embedding vector({{dimension}}) NOT NULL,
    PRIMARY KEY (namespace, model, position, id)
);
