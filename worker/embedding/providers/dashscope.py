"""DashScope native API: ``text_type``, ``instruct``, ``dimension``; results placed by index."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from worker.config import ProviderSettings
from worker.embedding.providers.base import Embedder, Embeddings, TransientError, assemble
from worker.embedding.providers.http import ApiClient, post_json
from worker.events import TextType

PATH = "/services/embeddings/text-embedding/text-embedding"
# Texts per request: text-embedding-v4's documented limit, on either endpoint (native or
# OpenAI-compatible); more is a 400 that no retry fixes.
MAX_TEXTS = 10


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
        self._client = ApiClient(settings)

    async def embed(self, texts: Sequence[str], text_type: TextType) -> Embeddings:
        parameters: dict[str, Any] = {
            "dimension": self.dimension,
            "text_type": text_type.value,
            "output_type": "dense",
        }
        if self.instruct and text_type is TextType.QUERY:
            parameters["instruct"] = self.instruct
        body = await post_json(
            self._client,
            PATH,
            {"model": self.model, "input": {"texts": list(texts)}, "parameters": parameters},
        )
        try:
            pairs = [(int(e["text_index"]), e["embedding"]) for e in body["output"]["embeddings"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise TransientError(f"malformed DashScope response: {exc!r}") from exc
        vectors = assemble(self.model, len(texts), self.dimension, pairs)
        tokens = (body.get("usage") or {}).get("total_tokens")
        return Embeddings(vectors, tokens)

    async def close(self) -> None:
        await self._client.aclose()
