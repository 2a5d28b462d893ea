"""A faithful local fake of Alibaba DashScope ``text-embedding-v4`` for tests and benchmarks.

Both dialects (native and OpenAI-compatible), the real limits and error bodies, and injectable
faults (429 with and without Retry-After, 500, timeouts, TCP resets, content-inspection refusals,
RPM/TPM quotas), and the OpenAI-compatible batch interface (files and batches, in
``batches.py``). Never imported by production code.
"""

from fakeapi.config import FakeConfig
from fakeapi.server import FakeEmbeddingServer
from fakeapi.tokens import count_tokens
from fakeapi.vectors import fake_vector

__all__ = ["FakeConfig", "FakeEmbeddingServer", "count_tokens", "fake_vector"]
