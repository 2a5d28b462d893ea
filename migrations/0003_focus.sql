-- Anomaly focus descriptions (worker/analysis/config.py: Focus) are label texts too.
ALTER TABLE label_vectors DROP CONSTRAINT label_vectors_kind_check;
ALTER TABLE label_vectors ADD CONSTRAINT label_vectors_kind_check
    CHECK (kind IN ('description', 'example', 'focus'));
