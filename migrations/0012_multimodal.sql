-- Multimodal events (docs/multimodal.md): the images and video a row was embedded from, as
-- [{"type": "image" | "video", "url": ...} or {"type": "image", "sha256": ..., "bytes": ...,
-- "format": ...} for a base64 data URI, whose bytes are not kept]. NULL for a text row. A
-- multimodal worker (provider.kind = dashscope-multimodal) runs against its own schema
-- (search_path in its DSN), so its `embeddings` table has the model's own dimension.
ALTER TABLE embeddings ADD COLUMN media jsonb;
