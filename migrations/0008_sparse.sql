-- Sparse (lexical) vectors beside the dense ones, for provider.output_type = 'dense&sparse'
-- (DashScope's native API): written in the same row and transaction as the dense vector,
-- NULL for providers without sparse output. The dimension bounds the token ids of the
-- provider's vocabulary (2^20, worker/embedding/providers/dashscope.py: SPARSE_DIMENSION);
-- a sparsevec stores only its non-zeros (at most 1,000 here, what pgvector's HNSW index
-- takes). A nullable column without a default: no table rewrite.
ALTER TABLE embeddings ADD COLUMN sparse sparsevec(1048576);
