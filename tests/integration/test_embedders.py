"""Every provider against the fake DashScope (HTTP) or in process (local models)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from fakeapi import FakeEmbeddingServer, fake_vector
from tests.conftest import dashscope, openai, wait_until
from worker.config import DASHSCOPE_TEXTS_LIMIT, load_settings
from worker.embedding.providers import create_embedder
from worker.embedding.providers import dashscope as dashscope_provider
from worker.embedding.providers.base import (
    ConfigurationFault,
    Embedder,
    PermanentError,
    TooManyInputs,
    TransientError,
)
from worker.embedding.providers.http import ApiClient, post_json
from worker.embedding.providers.local import usable_cpus
from worker.events import TextType

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "東京は今日も晴れです。",
    "Ein kurzer deutscher Satz über Wetter.",
    "Съешь же ещё этих мягких французских булок.",
    "الطقس جميل اليوم في المدينة.",
    "今天天气很好，我们去公园散步吧。",
    "Short one.",
    "Numbers 12345 and symbols: #, %, &.",
    "A tenth text to fill the batch.",
    "🙂 emoji and accents: déjà vu, naïve café.",
]
DIALECTS = ["dashscope", "openai"]


def provider(
    kind: str, fake: FakeEmbeddingServer, dimension: int = 256, **extra: Any
) -> dict[str, Any]:
    build = dashscope if kind == "dashscope" else openai
    return build(fake, dimension, **extra)


@contextlib.asynccontextmanager
async def embedder_for(provider_settings: dict[str, Any]) -> AsyncIterator[Embedder]:
    settings = load_settings(provider=provider_settings)
    embedder = create_embedder(settings.provider)
    try:
        yield embedder
    finally:
        await embedder.close()


def expected(texts: list[str], dimension: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.stack([fake_vector(t, dimension) for t in texts])


class Spy:
    """Wraps an embedder module's ``post_json`` to see what went over the wire."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self.payloads: list[dict[str, Any]] = []
        self.bodies: list[Any] = []

    async def __call__(self, client: ApiClient, path: str, payload: dict[str, Any]) -> Any:
        self.payloads.append(payload)
        body = await self.original(client, path, payload)
        self.bodies.append(body)
        return body


@pytest.fixture
def native_spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    spy = Spy(post_json)
    monkeypatch.setattr("worker.embedding.providers.dashscope.post_json", spy)
    return spy


@pytest.fixture
def openai_spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    spy = Spy(post_json)
    monkeypatch.setattr("worker.embedding.providers.openai.post_json", spy)
    return spy


# --- DashScope native ------------------------------------------------------------------------


@pytest.mark.parametrize("dimension", [64, 256, 1024])
async def test_native_vectors_in_order_even_when_shuffled(
    fake_api: FakeEmbeddingServer, native_spy: Spy, dimension: int
) -> None:
    fake_api.configure(shuffle=True)
    async with embedder_for(dashscope(fake_api, dimension)) as embedder:
        assert embedder.max_texts == 10 and embedder.dimension == dimension
        result = await embedder.embed(TEXTS, TextType.DOCUMENT)
    assert result.vectors.shape == (len(TEXTS), dimension)
    assert result.vectors.dtype == np.float32
    np.testing.assert_allclose(result.vectors, expected(TEXTS, dimension), rtol=0, atol=1e-6)
    # The fake did answer out of order, so placing by position would have failed.
    order = [e["text_index"] for e in native_spy.bodies[0]["output"]["embeddings"]]
    assert order != sorted(order)
    assert result.tokens == native_spy.bodies[0]["usage"]["total_tokens"] > 0
    assert fake_api.stats()["texts"] == len(TEXTS)


async def test_native_sends_text_type_dimension_and_instruct(
    fake_api: FakeEmbeddingServer, native_spy: Spy
) -> None:
    instruct = "Given a web search query, retrieve relevant passages"
    async with embedder_for(dashscope(fake_api, 128, instruct=instruct)) as embedder:
        doc = await embedder.embed(TEXTS[:3], TextType.DOCUMENT)
        query = await embedder.embed(TEXTS[:3], TextType.QUERY)
    params = [p["parameters"] for p in native_spy.payloads]
    assert [p["text_type"] for p in params] == ["document", "query"]
    assert all(p["dimension"] == 128 for p in params)
    assert "instruct" not in params[0]  # documents are embedded without the instruction
    assert params[1]["instruct"] == instruct
    assert native_spy.payloads[0]["input"] == {"texts": TEXTS[:3]}
    assert fake_api.stats()["by_dialect"] == {"native": 2}
    # The fake's vector ignores text_type; both calls were accepted and answered.
    np.testing.assert_allclose(doc.vectors, query.vectors)


# --- OpenAI dialect --------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["base64", "float"])
async def test_openai_dialect(
    fake_api: FakeEmbeddingServer, openai_spy: Spy, encoding: str
) -> None:
    fake_api.configure(shuffle=True)
    async with embedder_for(openai(fake_api, 512, encoding_format=encoding)) as embedder:
        result = await embedder.embed(TEXTS, TextType.DOCUMENT)
    np.testing.assert_allclose(result.vectors, expected(TEXTS, 512), rtol=0, atol=1e-6)
    payload = openai_spy.payloads[0]
    assert payload["encoding_format"] == encoding and payload["dimensions"] == 512
    raw = openai_spy.bodies[0]["data"]
    assert all(isinstance(d["embedding"], str if encoding == "base64" else list) for d in raw)
    assert [d["index"] for d in raw] != list(range(len(TEXTS)))
    assert fake_api.stats()["by_dialect"] == {"openai": 1}


async def test_openai_server_with_another_dimension_is_a_configuration_fault(
    fake_api: FakeEmbeddingServer,
) -> None:
    assert fake_api.config.default_dimension == 1024
    async with embedder_for(openai(fake_api, 256, send_dimensions=False)) as embedder:
        with pytest.raises(ConfigurationFault, match="dimension"):
            await embedder.embed(TEXTS[:2], TextType.DOCUMENT)


# --- errors, both dialects -------------------------------------------------------------------


@pytest.mark.parametrize("kind", DIALECTS)
async def test_wrong_key_is_a_configuration_fault(fake_api: FakeEmbeddingServer, kind: str) -> None:
    async with embedder_for(provider(kind, fake_api, api_key="sk-wrong")) as embedder:
        with pytest.raises(ConfigurationFault) as err:
            await embedder.embed(TEXTS[:1], TextType.DOCUMENT)
    assert err.value.code == "InvalidApiKey"
    assert fake_api.stats()["by_status"] == {401: 1}


@pytest.mark.parametrize("kind", DIALECTS)
async def test_revoked_key_is_a_configuration_fault(
    fake_api: FakeEmbeddingServer, kind: str
) -> None:
    fake_api.configure(auth_fault=True)
    async with embedder_for(provider(kind, fake_api)) as embedder:
        with pytest.raises(ConfigurationFault):
            await embedder.embed(TEXTS[:1], TextType.DOCUMENT)


@pytest.mark.parametrize("kind", DIALECTS)
async def test_poison_is_permanent_data_inspection_failed(
    fake_api: FakeEmbeddingServer, kind: str
) -> None:
    fake_api.configure(poison=["forbidden-word"])
    async with embedder_for(provider(kind, fake_api)) as embedder:
        ok = await embedder.embed(TEXTS[:2], TextType.DOCUMENT)
        assert ok.vectors.shape == (2, 256)
        with pytest.raises(PermanentError) as err:
            await embedder.embed([TEXTS[0], "a forbidden-word here"], TextType.DOCUMENT)
    assert type(err.value) is PermanentError
    assert err.value.code == "DataInspectionFailed"


async def test_eleven_texts_are_refused_by_the_fake(fake_api: FakeEmbeddingServer) -> None:
    eleven = [*TEXTS, "one too many"]
    assert len(eleven) == 11
    async with embedder_for(dashscope(fake_api)) as embedder:
        with pytest.raises(PermanentError) as err:
            await embedder.embed(eleven, TextType.DOCUMENT)
    assert type(err.value) is TooManyInputs  # a PermanentError the embed stage splits
    assert err.value.code == "InvalidParameter"
    assert fake_api.stats()["batch_sizes"] == {11: 1}


@pytest.mark.parametrize("kind", DIALECTS)
async def test_connection_reset_is_transient(fake_api: FakeEmbeddingServer, kind: str) -> None:
    fake_api.configure(rate_reset=1.0)
    async with embedder_for(provider(kind, fake_api)) as embedder:
        with pytest.raises(TransientError) as err:
            await embedder.embed(TEXTS[:2], TextType.DOCUMENT)
        assert err.value.code == "ConnectionError"
        fake_api.configure(rate_reset=0.0)
        # The same client recovers once the network does.
        result = await embedder.embed(TEXTS[:2], TextType.DOCUMENT)
    np.testing.assert_allclose(result.vectors, expected(TEXTS[:2], 256), atol=1e-6)
    assert fake_api.stats()["resets"] >= 1


async def test_timeout_is_transient(fake_api: FakeEmbeddingServer) -> None:
    fake_api.configure(rate_timeout=1.0, timeout_sleep_s=0.5)
    async with embedder_for(dashscope(fake_api, timeout_s=0.05)) as embedder:
        with pytest.raises(TransientError) as err:
            await embedder.embed(TEXTS[:1], TextType.DOCUMENT)
    assert err.value.code == "Timeout"


@pytest.mark.parametrize(("status_fault", "status"), [("rate_500", 500), ("rate_429", 429)])
async def test_server_errors_are_transient(
    fake_api: FakeEmbeddingServer, status_fault: str, status: int
) -> None:
    fake_api.configure(**{status_fault: 1.0, "retry_after_s": 0.25})
    async with embedder_for(dashscope(fake_api)) as embedder:
        with pytest.raises(TransientError) as err:
            await embedder.embed(TEXTS[:1], TextType.DOCUMENT)
    assert type(err.value) is TransientError
    assert err.value.retry_after == (0.25 if status == 429 else None)
    assert fake_api.stats()["by_status"] == {status: 1}


# --- local models ----------------------------------------------------------------------------


def cosine(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


async def test_local_use_model() -> None:
    sentences = [
        "The cat is sitting on the mat.",
        "A cat sits on a rug.",
        "Le chat est assis sur le tapis.",
        "Quarterly revenue fell by twelve percent.",
    ]
    async with embedder_for({"kind": "local"}) as embedder:
        assert embedder.dimension == 512 and embedder.max_texts == 64
        result = await embedder.embed(sentences, TextType.DOCUMENT)
        again = await embedder.embed(sentences[:1], TextType.QUERY)
    v = result.vectors
    assert v.shape == (4, 512) and v.dtype == np.float32
    assert np.all(np.isfinite(v))
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-3)
    assert cosine(v[0], v[1]) > cosine(v[0], v[3]) + 0.2
    assert cosine(v[0], v[2]) > cosine(v[0], v[3])  # multilingual
    np.testing.assert_allclose(again.vectors[0], v[0], atol=1e-5)  # deterministic


async def test_local_e5_model() -> None:
    texts = ["how do I bake bread?", "Bread is baked from flour, water, yeast and salt."]
    async with embedder_for({"kind": "local", "model": "multilingual-e5-small"}) as embedder:
        assert embedder.dimension == 384
        passages = await embedder.embed(texts, TextType.DOCUMENT)
        queries = await embedder.embed(texts, TextType.QUERY)
    assert passages.vectors.shape == queries.vectors.shape == (2, 384)
    assert np.all(np.isfinite(passages.vectors)) and np.all(np.isfinite(queries.vectors))
    # "query: " and "passage: " prefixes give different vectors for the same text.
    for q, p in zip(queries.vectors, passages.vectors, strict=True):
        assert not np.allclose(q, p, atol=1e-4)
        assert cosine(q, p) > 0.5


ORPHAN_SCRIPT = """
import asyncio, multiprocessing, os, signal, sys
from worker.config import ProviderSettings
from worker.embedding.providers.local import LocalEmbedder

async def main():
    spec = {"kind": "local", "model": "use-multilingual-v3", "dimension": 512}
    embedder = LocalEmbedder(ProviderSettings.model_validate(spec))
    await embedder.start()
    with open(sys.argv[1], "w") as out:
        out.write(" ".join(str(c.pid) for c in multiprocessing.active_children()))
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


async def test_the_model_process_exits_when_its_worker_is_killed(tmp_path: Path) -> None:
    """kill -9 (or the OOM killer) cannot stop the model's process: it must notice alone."""
    pids = tmp_path / "children"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ORPHAN_SCRIPT, str(pids), stdout=asyncio.subprocess.DEVNULL
    )
    assert await asyncio.wait_for(proc.wait(), timeout=120) == -signal.SIGKILL
    children = [int(pid) for pid in pids.read_text().split()]
    assert children, "the model ran in a child process"

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    async def all_gone() -> bool:
        return not any(alive(p) for p in children)

    try:
        await wait_until(all_gone, 10, "the orphaned model process is still running")
    finally:
        for pid in filter(alive, children):
            os.kill(pid, signal.SIGKILL)


async def forward_proxy(seen: list[tuple[str, str | None]]) -> asyncio.Server:
    """A plain HTTP forward proxy: one request per connection, relayed to its target; ``seen``
    gets each request line with its Proxy-Authorization."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        line, *headers = [h for h in head.split("\r\n") if h]
        auth = [h.split(":", 1)[1].strip() for h in headers if h.lower().startswith("proxy-auth")]
        seen.append((line, auth[0] if auth else None))
        method, target, protocol = line.split(" ")
        length = sum(
            int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:")
        )
        body = await reader.readexactly(length)
        url = httpx.URL(target)
        kept = [h for h in headers if not h.lower().startswith(("connection:", "proxy-"))]
        upstream_reader, upstream = await asyncio.open_connection(url.host, url.port)
        request = [f"{method} {url.raw_path.decode()} {protocol}", *kept, "Connection: close"]
        upstream.write(("\r\n".join(request) + "\r\n\r\n").encode() + body)
        writer.write(await upstream_reader.read())
        await writer.drain()
        upstream.close()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_requests_go_through_the_proxy_the_environment_names(
    fake_api: FakeEmbeddingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, str | None]] = []
    proxy = await forward_proxy(seen)
    port = proxy.sockets[0].getsockname()[1]
    for name in ("NO_PROXY", "no_proxy", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://user:pass@127.0.0.1:{port}")
    texts = ["through the proxy", "and back"]
    try:
        async with embedder_for(openai(fake_api)) as embedder:
            result = await embedder.embed(texts, TextType.DOCUMENT)
        np.testing.assert_allclose(result.vectors, expected(texts, 256), atol=1e-6)
        assert len(seen) == 1 and seen[0][0].startswith(f"POST {fake_api.openai_url}")
        assert seen[0][1] == "Basic dXNlcjpwYXNz"  # user:pass, from the proxy's URL
        # NO_PROXY names the provider's host: straight there, past the proxy.
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        async with embedder_for(openai(fake_api)) as embedder:
            await embedder.embed(texts, TextType.DOCUMENT)
        assert len(seen) == 1
    finally:
        proxy.close()
        await proxy.wait_closed()


# --- the providers' own rules: texts per request, the local model's threads -------------------


@pytest.mark.parametrize(
    ("provider", "expected"),
    [
        ({"kind": "dashscope"}, 10),
        ({"kind": "openai"}, 10),  # the default URL: DashScope's OpenAI-compatible endpoint
        ({"kind": "openai", "base_url": "https://dashscope.aliyuncs.com/compatible-mode/v1"}, 10),
        ({"kind": "openai", "base_url": "http://tei.internal:8080/v1"}, 32),
        (
            {"kind": "openai", "base_url": "http://tei.internal/v1", "max_texts_per_request": 500},
            500,
        ),
        ({"kind": "local"}, 64),
        ({"kind": "local", "max_texts_per_request": 16}, 16),
    ],
)
async def test_texts_per_request_default_by_provider(
    provider: dict[str, Any], expected: int
) -> None:
    async with embedder_for({**provider, "api_key": "sk-test"}) as embedder:
        assert embedder.max_texts == expected


def test_the_settings_refuse_what_dashscope_refuses() -> None:
    """The settings validator states DashScope's limit apart (this module imports config)."""
    assert DASHSCOPE_TEXTS_LIMIT == dashscope_provider.MAX_TEXTS


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, None),  # no cgroup files: the affinity alone
        ({"cpu.max": "max 100000\n"}, None),  # v2, unlimited
        ({"cpu.max": "150000 100000\n"}, 2),  # v2, 1.5 CPUs: rounded up
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu.max": "50000 0\n"}, None),  # nonsense is ignored, not a crash at start
        ({"cpu.max": "garbage\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
    ],
)
def test_usable_cpus_counts_a_cgroup_cpu_limit(
    tmp_path: Path, files: dict[str, str], expected: int | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    got = usable_cpus(tmp_path)
    assert got == (affinity if expected is None else min(affinity, expected))
