-- A moderation decision withdrawn ({"id": ..., "label": null}, worker/analysis/decisions.py):
-- its row stays, marked, and takes the withdrawal's decision_partition/offset, so a replay of
-- the decision it withdrew never brings it back; a later decision for the id clears the mark.
-- Whatever reads decisions as examples skips withdrawn rows.
ALTER TABLE label_vectors ADD COLUMN withdrawn boolean NOT NULL DEFAULT false;
