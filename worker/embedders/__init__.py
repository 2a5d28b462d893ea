"""Embedding providers behind one interface (see base.Embedder)."""

from __future__ import annotations

from worker.config import ProviderKind, ProviderSettings
from worker.embedders.base import Embedder


def create_embedder(settings: ProviderSettings) -> Embedder:
    """Build the configured provider (imports only what that provider needs)."""
    if settings.kind is ProviderKind.LOCAL:
        from worker.embedders.local import LocalEmbedder

        return LocalEmbedder(settings)
    if settings.kind is ProviderKind.DASHSCOPE:
        from worker.embedders.dashscope import DashScopeEmbedder

        return DashScopeEmbedder(settings)
    from worker.embedders.openai import OpenAIEmbedder

    return OpenAIEmbedder(settings)
