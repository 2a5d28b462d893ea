-- Moderation decisions (worker/analysis/decisions.py): labeled examples added while the worker
-- runs, one row of kind 'decision' per decided event id (namespace, model, decided_id), which a
-- later decision for the same id replaces. Its text_hash is its content's, as for the other
-- kinds, so two ids with the same text are two rows: the file's texts stay unique by
-- (namespace, model, kind, label, text_hash), decisions by their id.
--   decision_partition/offset: where the decision was read; a replay of an older one from the
--                   same partition never replaces a newer one.
--   decision_state: per namespace, a counter raised by every transaction that changes its
--                   decisions: replicas compare it with what they loaded to rebuild the label set.
ALTER TABLE label_vectors DROP CONSTRAINT label_vectors_kind_check;
ALTER TABLE label_vectors ADD CONSTRAINT label_vectors_kind_check
    CHECK (kind IN ('description', 'example', 'focus', 'decision'));
ALTER TABLE label_vectors
    ADD COLUMN decided_id text,
    ADD COLUMN decision_partition integer,
    ADD COLUMN decision_offset bigint,
    ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now(),
    ADD CONSTRAINT label_vectors_decision_check
        CHECK ((kind = 'decision') = (decided_id IS NOT NULL));
ALTER TABLE label_vectors DROP CONSTRAINT label_vectors_pkey;
CREATE UNIQUE INDEX label_vectors_text_key ON label_vectors (namespace, model, kind, label, text_hash)
    WHERE kind <> 'decision';
CREATE UNIQUE INDEX label_vectors_decision_key ON label_vectors (namespace, model, decided_id)
    WHERE kind = 'decision';

CREATE TABLE decision_state (
    namespace  text        NOT NULL,
    model      text        NOT NULL,
    version    bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, model)
);
