"""DashScope's multimodal endpoint: text, images and video in one vector space.

One event per request: its parts (the text, each image, the video) go as one ``contents``
list, which keeps every request within the models' per-request limits (one text, up to 8
images or 1 for multimodal-embedding-v1, one video). The endpoint answers one vector per
part; the event's vector is their mean, normalised to unit length, so an image with its
caption is found by either. A text alone (a search query, a text-only event) is one part.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from worker.config import MULTIMODAL_MODELS, ProviderSettings
from worker.embedding.providers.base import (
    Embedder,
    Embeddings,
    Parts,
    TransientError,
    assemble,
)
from worker.embedding.providers.http import ApiClient, post_json
from worker.events import TextType

PATH = "/services/embeddings/multimodal-embedding/multimodal-embedding"


def contents(text: str, media: Parts) -> list[dict[str, str]]:
    """The request's ``contents`` for one event: its text (if any), then its media."""
    parts = [{"text": text}] if text.strip() else []
    return parts + [{kind: reference} for kind, reference in media]


class MultimodalEmbedder(Embedder):
    def __init__(self, settings: ProviderSettings) -> None:
        self.model = settings.model_name
        self.dimension = MULTIMODAL_MODELS[self.model].dimension
        self.max_texts = 1
        self._client = ApiClient(settings)

    async def embed(self, texts: Sequence[str], text_type: TextType) -> Embeddings:
        return await self.embed_media(texts, [()] * len(texts), text_type)

    async def embed_media(
        self, texts: Sequence[str], media: Sequence[Parts], text_type: TextType
    ) -> Embeddings:
        vectors = np.empty((len(texts), self.dimension), dtype=np.float32)
        tokens = 0
        for i, (text, parts) in enumerate(zip(texts, media, strict=True)):
            vectors[i], used = await self._one(contents(text, parts))
            tokens += used
        return Embeddings(vectors, tokens)

    async def _one(self, parts: list[dict[str, str]]) -> tuple[np.ndarray, int]:
        body = await post_json(
            self._client, PATH, {"model": self.model, "input": {"contents": parts}}
        )
        try:
            items = body["output"]["embeddings"]
            pairs = [(int(e["index"]), e["embedding"]) for e in items]
            usage: dict[str, Any] = body.get("usage") or {}
            used = int(usage.get("input_tokens") or 0)
        except (KeyError, TypeError, ValueError) as exc:
            raise TransientError(f"malformed DashScope response: {exc!r}") from exc
        each = assemble(self.model, len(parts), self.dimension, pairs)
        mean = each.mean(axis=0)
        norm = float(np.linalg.norm(mean))
        return (mean / norm if norm > 0 else mean), used

    async def close(self) -> None:
        await self._client.aclose()
