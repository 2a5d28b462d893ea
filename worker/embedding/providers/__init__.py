"""Embedding providers behind one interface (see base.Embedder)."""

from __future__ import annotations

from worker.config import ProviderKind, ProviderSettings
from worker.embedding.providers.base import Embedder


def create_embedder(settings: ProviderSettings) -> Embedder:
    """Build the configured provider (imports only what that provider needs)."""
    if settings.kind is ProviderKind.LOCAL:
        from worker.embedding.providers.local import LocalEmbedder

        return LocalEmbedder(settings)
    if settings.kind is ProviderKind.DASHSCOPE:
        from worker.embedding.providers.dashscope import DashScopeEmbedder

        return DashScopeEmbedder(settings)
    if settings.kind is ProviderKind.DASHSCOPE_MULTIMODAL:
        from worker.embedding.providers.multimodal import MultimodalEmbedder

        return MultimodalEmbedder(settings)
    from worker.embedding.providers.openai import OpenAIEmbedder

    return OpenAIEmbedder(settings)
