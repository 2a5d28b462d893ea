-- Analysis state, all keyed by (namespace, model) and changed only in the transaction that
-- stores the offsets of the events it came from.
--   label_vectors:  each label set's descriptions and examples, embedded once,
--                   content-addressed by the text's hash.
--   analysis_state: per namespace, additive sums that replicas add to: events seen and the
--                   sum of their unit vectors (the stream's centroid), and the histogram of
--                   anomaly scores (the learned threshold).
--   label_state:    per label, the events classified with it and the sum of their vectors
--                   (the self-trained prototype).
--   analysis_points: recent events by position in their namespace, with the label they were
--                   given: the history of the k-NN vote and the k-NN anomaly distance.
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

CREATE TABLE analysis_state (
    namespace  text               NOT NULL,
    model      text               NOT NULL,
    seen       bigint             NOT NULL,
    vector_sum double precision[] NOT NULL,
    score_hist double precision[] NOT NULL,
    updated_at timestamptz        NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, model)
);

CREATE TABLE label_state (
    namespace  text               NOT NULL,
    model      text               NOT NULL,
    label      text               NOT NULL,
    members    bigint             NOT NULL,
    vector_sum double precision[] NOT NULL,
    updated_at timestamptz        NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, model, label)
);

CREATE TABLE analysis_points (
    namespace text        NOT NULL,
    model     text        NOT NULL,
    position  bigint      NOT NULL,
    id        text        NOT NULL,
    label     text,
    embedding vector({{dimension}}) NOT NULL,
    PRIMARY KEY (namespace, model, position, id)
);
