"""DashScope native API: ``text_type``, ``instruct``, ``dimension``, ``output_type`` (dense, or
dense and sparse); results placed by index."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from pgvector import SparseVector

from worker.config import ProviderSettings
from worker.embedding.providers.base import (
    SPARSE_MAX_ENTRIES,
    ConfigurationFault,
    Embedder,
    Embeddings,
    TransientError,
    assemble,
)
from worker.embedding.providers.http import ApiClient, post_json
from worker.events import TextType

PATH = "/services/embeddings/text-embedding/text-embedding"
# Texts per request: text-embedding-v4's documented limit, on either endpoint (native or
# OpenAI-compatible); more is a 400 that no retry fixes.
MAX_TEXTS = 10
# The sparse column's dimension (migrations/0008_sparse.sql): indices are token ids of the
# model's vocabulary, which DashScope does not publish. 2^20 covers every common one with
# room (Qwen3's 151,669 tokens, XLM-R's 250,002 of the fake, Gemma 3's 262,144); a sparsevec
# stores only its non-zeros, so the bound costs nothing.
SPARSE_DIMENSION = 1 << 20


def is_dashscope_url(url: str) -> bool:
    """DashScope's own endpoints (either dialect), whose per-request limits are known."""
    host = (urlsplit(url).hostname or "").lower()
    return host.startswith("dashscope") and host.endswith(".aliyuncs.com")


class DashScopeEmbedder(Embedder):
    def __init__(self, settings: ProviderSettings) -> None:
        self.model = settings.model_name
        self.dimension = settings.dim
        self.max_texts = min(settings.max_texts_per_request or MAX_TEXTS, MAX_TEXTS)
        self.instruct = settings.instruct
        self.output_type = settings.output_type
        self.sparse = settings.sparse
        self._client = ApiClient(settings)

    async def embed(self, texts: Sequence[str], text_type: TextType) -> Embeddings:
        parameters: dict[str, Any] = {
            "dimension": self.dimension,
            "text_type": text_type.value,
            "output_type": self.output_type.value,
        }
        if self.instruct and text_type is TextType.QUERY:
            parameters["instruct"] = self.instruct
        body = await post_json(
            self._client,
            PATH,
            {"model": self.model, "input": {"texts": list(texts)}, "parameters": parameters},
        )
        try:
            items = body["output"]["embeddings"]
            pairs = [(int(e["text_index"]), e["embedding"]) for e in items]
            sparse = (
                [(int(e["text_index"]), sparse_vector(e["sparse_embedding"])) for e in items]
                if self.sparse
                else None
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TransientError(f"malformed DashScope response: {exc!r}") from exc
        vectors = assemble(self.model, len(texts), self.dimension, pairs)
        tokens = (body.get("usage") or {}).get("total_tokens")
        if sparse is None:
            return Embeddings(vectors, tokens)
        by_index = dict(sparse)  # assemble checked the indices: each text once
        return Embeddings(vectors, tokens, [by_index[i] for i in range(len(texts))])

    async def close(self) -> None:
        await self._client.aclose()


def sparse_vector(entries: list[dict[str, Any]]) -> SparseVector:
    """``sparse_embedding`` ([{index, value, token}]) as a sparsevec of ``SPARSE_DIMENSION``:
    its ``SPARSE_MAX_ENTRIES`` heaviest entries (ties by index), zeros dropped, a repeated
    index summed. An index past the column is a vocabulary the schema does not cover: a
    configuration fault (stop, lose nothing), not a data error."""
    weights: dict[int, float] = {}
    for e in entries:
        index, value = int(e["index"]), float(e["value"])
        if not 0 <= index < SPARSE_DIMENSION:
            raise ConfigurationFault(
                f"DashScope answered sparse index {index}, outside the sparse column's "
                f"{SPARSE_DIMENSION} dimensions (migrations/0008_sparse.sql)"
            )
        weights[index] = weights.get(index, 0.0) + value
    kept = sorted((i for i in weights if weights[i] != 0.0), key=lambda i: (-weights[i], i))
    return SparseVector({i: weights[i] for i in kept[:SPARSE_MAX_ENTRIES]}, SPARSE_DIMENSION)
