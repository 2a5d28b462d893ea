-- Chunks of long documents (oversize_policy = 'chunk', worker/chunking.py): each chunk is its
-- own row, keyed (namespace, id, chunk), with the document's metadata and content hash (the
-- whole text's). A document that is not chunked is chunk 0, so every existing row becomes
-- chunk 0 of its document and nothing else changes for it. The constant default needs no
-- table rewrite; the primary key is rebuilt (one index build). Tombstones stay per document:
-- a delete removes all of a document's chunks.
ALTER TABLE embeddings ADD COLUMN chunk integer NOT NULL DEFAULT 0 CHECK (chunk >= 0);
ALTER TABLE embeddings DROP CONSTRAINT embeddings_pkey;
ALTER TABLE embeddings ADD PRIMARY KEY (namespace, id, chunk);
