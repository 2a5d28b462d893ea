"""embedding-worker: Kafka content events -> embeddings -> Postgres/pgvector."""

__version__ = "0.1.0"
