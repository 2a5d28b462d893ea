"""The batch client against the fake's batch interface: results placed by custom_id, failed
lines classified as the real-time path would classify their answers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest

from fakeapi import FakeEmbeddingServer, count_tokens, fake_vector
from tests.conftest import dashscope, openai
from worker.config import load_settings
from worker.embedding.providers.base import PermanentError, TooManyInputs, TransientError
from worker.embedding.providers.batch import BatchClient, BatchFailed, Line, base_url

DIM = 64


@pytest.fixture
def fake(fake_api: FakeEmbeddingServer) -> FakeEmbeddingServer:
    return fake_api


@pytest.fixture
async def client(fake: FakeEmbeddingServer) -> AsyncIterator[BatchClient]:
    settings = load_settings(provider=dashscope(fake, DIM))
    batches = BatchClient(settings.provider, poll_initial_s=0.01, poll_max_s=0.05)
    try:
        yield batches
    finally:
        await batches.close()


def counts(lines: list[Line]) -> dict[str, int]:
    return {line.custom_id: len(line.texts) for line in lines}


async def run(client: BatchClient, lines: list[Line]) -> tuple[str, dict[str, object]]:
    batch_id = await client.create(await client.upload(lines), {"job": "test"})
    return batch_id, await client.wait(batch_id)


def test_the_batch_base_is_the_compatible_one_beside_either_dialect(
    fake: FakeEmbeddingServer,
) -> None:
    native = load_settings(provider=dashscope(fake, DIM)).provider
    compatible = load_settings(provider=openai(fake, DIM)).provider
    assert base_url(native) == base_url(compatible) == fake.openai_url


async def test_vectors_come_back_by_custom_id(
    fake: FakeEmbeddingServer, client: BatchClient
) -> None:
    fake.configure(batch_delay_s=0.1)
    lines = [
        Line("b", ["two", "three"]),
        Line("a", ["one"]),
        Line("c", [f"t{i}" for i in range(10)]),
    ]
    _, batch = await run(client, lines)
    assert batch["status"] == "completed"
    outcome = await client.outcome(batch, counts(lines))
    assert outcome.status == "completed" and not outcome.failed
    for line in lines:
        got = outcome.embedded[line.custom_id]
        want = np.stack([fake_vector(t, DIM) for t in line.texts])
        assert np.allclose(got.vectors, want, atol=1e-6)
    assert outcome.tokens == sum(count_tokens(t) for line in lines for t in line.texts)
    assert fake.batch_stats()["tokens"] == outcome.tokens


async def test_failed_lines_carry_the_real_time_error_classes(
    fake: FakeEmbeddingServer, client: BatchClient
) -> None:
    fake.configure(poison=["BADWORD"], max_texts=2)
    lines = [Line("ok", ["fine"]), Line("bad", ["a BADWORD"]), Line("many", ["x", "y", "z"])]
    _, batch = await run(client, lines)
    outcome = await client.outcome(batch, counts(lines))
    assert set(outcome.embedded) == {"ok"}
    assert isinstance(outcome.failed["bad"], PermanentError)
    assert outcome.failed["bad"].code == "DataInspectionFailed"
    assert isinstance(outcome.failed["many"], TooManyInputs)


async def test_an_expired_job_gives_its_done_lines_and_transient_errors_for_the_rest(
    fake: FakeEmbeddingServer, client: BatchClient
) -> None:
    fake.configure(batch_expire=True)
    lines = [Line(str(i), [f"t{i}"]) for i in range(4)]
    _, batch = await run(client, lines)
    outcome = await client.outcome(batch, counts(lines))
    assert outcome.status == "expired"
    assert set(outcome.embedded) == {"0", "1"}
    assert {k: type(e) for k, e in outcome.failed.items()} == {
        "2": TransientError,
        "3": TransientError,
    }
    assert {e.code for e in outcome.failed.values()} == {"batch_expired"}


async def test_injected_line_failures_are_transient(
    fake: FakeEmbeddingServer, client: BatchClient
) -> None:
    fake.configure(batch_line_failure_rate=0.5, seed=3)
    lines = [Line(str(i), [f"t{i}"]) for i in range(20)]
    _, batch = await run(client, lines)
    outcome = await client.outcome(batch, counts(lines))
    assert outcome.failed and outcome.embedded
    assert set(outcome.failed) | set(outcome.embedded) == {str(i) for i in range(20)}
    assert all(isinstance(e, TransientError) and e.status == 500 for e in outcome.failed.values())


async def test_a_cancelled_job_is_a_batch_failure(
    fake: FakeEmbeddingServer, client: BatchClient
) -> None:
    fake.configure(batch_delay_s=60.0)
    lines = [Line("a", ["x"])]
    batch_id = await client.create(await client.upload(lines))
    await client._call("POST", f"/batches/{batch_id}/cancel")
    batch = await client.wait(batch_id)
    with pytest.raises(BatchFailed, match="cancelled"):
        await client.outcome(batch, counts(lines))


def test_a_line_over_the_texts_limit_is_never_written(client: BatchClient) -> None:
    with pytest.raises(ValueError, match="11 texts"):
        client.jsonl([Line("a", [str(i) for i in range(11)])])


async def test_a_created_batch_is_found_by_its_input_file(client: BatchClient) -> None:
    lines = [Line("a", ["x"])]
    first, second = await client.upload(lines), await client.upload(lines)
    batch_id = await client.create(first)
    assert await client.find(first) == batch_id
    assert await client.find(second) is None
