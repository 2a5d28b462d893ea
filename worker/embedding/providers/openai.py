"""Any OpenAI-compatible ``/embeddings`` endpoint (DashScope compatible mode, vLLM, TEI, ...)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pybase64

from worker.config import DEFAULT_URLS, ProviderKind, ProviderSettings
from worker.embedding.providers import dashscope
from worker.embedding.providers.base import Embedder, Embeddings, TransientError, assemble
from worker.embedding.providers.http import ApiClient, post_json
from worker.events import TextType

# Texts per request of a server that is not DashScope: the smallest common limit (TEI's
# default max-client-batch-size; OpenAI takes 2,048, vLLM and Ollama set none), so no server
# at its defaults refuses it, at a third of the requests of 10.
MAX_TEXTS = 32


def default_max_texts(base_url: str | None) -> int:
    """DashScope's limit on its OpenAI-compatible endpoint (the default URL), else ours."""
    url = base_url or DEFAULT_URLS[ProviderKind.OPENAI]
    return dashscope.MAX_TEXTS if dashscope.is_dashscope_url(url) else MAX_TEXTS


class OpenAIEmbedder(Embedder):
    def __init__(self, settings: ProviderSettings) -> None:
        self.model = settings.model_name
        self.dimension = settings.dim
        self.max_texts = settings.max_texts_per_request or default_max_texts(settings.base_url)
        self.encoding_format = settings.encoding_format
        self.send_dimensions = settings.send_dimensions
        self._client = ApiClient(settings)

    async def embed(self, texts: Sequence[str], text_type: TextType) -> Embeddings:
        payload: dict[str, Any] = {
            "model": self.model,
            "input": list(texts),
            "encoding_format": self.encoding_format,
        }
        if self.send_dimensions:
            payload["dimensions"] = self.dimension
        body = await post_json(self._client, "/embeddings", payload)
        try:
            pairs = [(int(d["index"]), _decode(d["embedding"])) for d in body["data"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise TransientError(f"malformed embeddings response: {exc!r}") from exc
        vectors = assemble(self.model, len(texts), self.dimension, pairs)
        tokens = (body.get("usage") or {}).get("total_tokens")
        return Embeddings(vectors, tokens)

    async def close(self) -> None:
        await self._client.aclose()


def _decode(embedding: Any) -> np.ndarray:
    """Servers that honour ``encoding_format=base64`` send little-endian float32 bytes.

    pybase64 (SIMD) rather than the standard library: ``base64.b64decode`` took ~10 us per
    1024-d vector, ~9 % of the worker's CPU in benchmark scenario 1; pybase64 takes <1 us.
    ``validate``: a character outside the alphabet is an error (a malformed answer, retried),
    not silently skipped.
    """
    if isinstance(embedding, str):
        return np.frombuffer(pybase64.b64decode(embedding, validate=True), dtype="<f4")
    return np.asarray(embedding, dtype=np.float32)
