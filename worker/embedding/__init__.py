"""Texts into vectors: the embed stage, its limits (concurrency, rate, breaker), the providers."""
