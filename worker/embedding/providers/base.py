"""One interface for every embedding provider, and the errors that tell the pipeline what to do.

The error classes carry the decision, not the HTTP detail: transient (retry later),
permanent for the request (split the batch to find the bad item), or a configuration fault
(stop consuming; never dead-letter good data for it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pgvector import SparseVector

from worker.events import TextType

# An event's images and video: (kind, URL or data URI), kind "image" or "video".
Parts = tuple[tuple[str, str], ...]


class EmbeddingError(Exception):
    def __init__(self, message: str, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status  # the HTTP status when the provider answered


class TransientError(EmbeddingError):
    """429, 5xx, timeouts, resets: the same request may succeed later."""

    def __init__(
        self,
        message: str,
        code: str | None = None,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message, code, status)
        self.retry_after = retry_after


class PermanentError(EmbeddingError):
    """The provider refused the request's content (400); retrying it as-is cannot help."""


class TooManyInputs(PermanentError):
    """The server takes fewer texts per request than were sent: the worker's batch size, not
    the data, is wrong (the embed stage lowers it and sends the texts again, split)."""


# pgvector's HNSW index takes a sparsevec of at most 1,000 non-zeros (and refuses to insert a
# longer one into an indexed column): a text's sparse vector keeps its 1,000 heaviest tokens
# (docs/retrieval.md: how many texts that touches).
SPARSE_MAX_ENTRIES = 1_000
# Provider error codes that mean "your account or key", whatever status carries them.
CONFIG_CODES = {"InvalidApiKey", "AccessDenied", "Arrearage", "Model.AccessDenied"}


class ConfigurationFault(EmbeddingError):
    """401/403/arrears or a wrong model/dimension: the worker's setup, not the data, is wrong."""


@dataclass(frozen=True, slots=True)
class Embeddings:
    vectors: np.ndarray  # (n, dimension) float32, row i for text i
    tokens: int | None = None  # as reported by the provider, when it reports it
    # With provider.output_type = dense&sparse: text i's sparse vector at i; else None.
    sparse: list[SparseVector] | None = None


class Embedder(ABC):
    """Embeds at most ``max_texts`` texts per call; the batcher guarantees the limits.

    ``start()`` before the first event and ``close()`` at the end are the provider's own
    (the local model's process), so the worker starts and stops any provider alike; an
    embedder that is never started still embeds (its first call does what ``start`` would).
    """

    model: str
    dimension: int
    max_texts: int
    # Whether each text also gets a sparse vector (provider.output_type = dense&sparse).
    sparse: bool = False

    @abstractmethod
    async def embed(self, texts: Sequence[str], text_type: TextType) -> Embeddings: ...

    async def embed_media(
        self, texts: Sequence[str], media: Sequence[Parts], text_type: TextType
    ) -> Embeddings:
        """Events with images or a video ((kind, URL or data URI)), text i beside media i:
        only a multimodal provider has this (decode gives media to no other)."""
        raise ConfigurationFault(f"{self.model} embeds text only, not images or video")

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Get ready before the first event, so that start-up errors surface at start."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or processes."""


def assemble(
    model: str, count: int, dimension: int, pairs: Iterable[tuple[int, Any]]
) -> np.ndarray:
    """Place vectors by the index the provider gave (answers may come in any order)."""
    vectors = np.empty((count, dimension), dtype=np.float32)
    seen: set[int] = set()
    for index, raw in pairs:
        vector = np.asarray(raw, dtype=np.float32)
        if vector.shape != (dimension,):
            raise ConfigurationFault(
                f"{model} returned a vector of shape {vector.shape}, expected ({dimension},): "
                "check provider.dimension"
            )
        if not 0 <= index < count or index in seen:
            raise TransientError(f"{model} answered with a bad or repeated index {index}")
        vectors[index] = vector
        seen.add(index)
    if len(seen) != count:
        raise TransientError(f"{model} answered {len(seen)} of {count} texts")
    return vectors
