"""The fake's batch interface must behave as DashScope's OpenAI-compatible one does (files,
batches, their statuses, output and error files), or the backfill tests built on it lie."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fakeapi import FakeEmbeddingServer, count_tokens, fake_vector

KEY = {"Authorization": "Bearer test-key"}


@pytest.fixture
def server() -> Iterator[FakeEmbeddingServer]:
    with FakeEmbeddingServer() as fake:
        yield fake


@pytest.fixture
def client(server: FakeEmbeddingServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.openai_url, headers=KEY, timeout=5.0) as c:
        yield c


def line(custom_id: str, texts: list[str], **extra: Any) -> dict[str, Any]:
    body = {"model": "text-embedding-v4", "input": texts, "dimensions": 64, **extra}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body}


def upload(client: httpx.Client, lines: list[Any], purpose: str = "batch") -> httpx.Response:
    content = "".join(json.dumps(x) + "\n" for x in lines).encode()
    return client.post("/files", data={"purpose": purpose}, files={"file": ("in.jsonl", content)})


def submit(client: httpx.Client, lines: list[Any]) -> dict[str, Any]:
    r = upload(client, lines)
    assert r.status_code == 200, r.text
    r = client.post(
        "/batches",
        json={
            "input_file_id": r.json()["id"],
            "endpoint": "/v1/embeddings",
            "completion_window": "24h",
        },
    )
    assert r.status_code == 200, r.text
    batch: dict[str, Any] = r.json()
    return batch


def get(client: httpx.Client, batch_id: str) -> dict[str, Any]:
    r = client.get(f"/batches/{batch_id}")
    assert r.status_code == 200, r.text
    batch: dict[str, Any] = r.json()
    return batch


def wait(client: httpx.Client, batch_id: str) -> dict[str, Any]:
    """Poll until the job ends (the fake moves one status per look at least)."""
    for _ in range(10_000):
        batch = get(client, batch_id)
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return batch
        time.sleep(0.01)
    raise AssertionError(f"batch {batch_id} never ended")


def content(client: httpx.Client, file_id: str) -> dict[str, dict[str, Any]]:
    r = client.get(f"/files/{file_id}/content")
    assert r.status_code == 200, r.text
    rows = [json.loads(x) for x in r.content.decode().splitlines()]
    return {row["custom_id"]: row for row in rows}


def test_a_batch_runs_every_line_and_places_results_by_custom_id(
    server: FakeEmbeddingServer, client: httpx.Client
) -> None:
    texts = {"a": ["one", "two"], "b": ["東京は晴れです。"], "c": [f"t{i}" for i in range(10)]}
    batch = submit(client, [line(k, v) for k, v in texts.items()])
    assert batch["status"] == "validating" and batch["endpoint"] == "/v1/embeddings"
    done = wait(client, batch["id"])
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert done["error_file_id"] is None
    out = content(client, done["output_file_id"])
    assert set(out) == set(texts)
    for custom_id, sent in texts.items():
        response = out[custom_id]["response"]
        assert response["status_code"] == 200 and out[custom_id]["error"] is None
        data = sorted(response["body"]["data"], key=lambda d: d["index"])
        for text, item in zip(sent, data, strict=True):
            assert item["embedding"] == pytest.approx(fake_vector(text, 64).tolist(), abs=1e-6)
        assert response["body"]["usage"]["total_tokens"] == sum(count_tokens(t) for t in sent)
    total = sum(count_tokens(t) for v in texts.values() for t in v)
    assert server.batch_stats() == {"created": 1, "lines": 3, "tokens": total}
    # The real-time counters do not see a batch's tokens (they are billed at the batch price).
    assert server.stats()["tokens"] == 0


def test_statuses_follow_the_completion_delay(
    server: FakeEmbeddingServer, client: httpx.Client
) -> None:
    server.configure(batch_delay_s=0.3)
    batch = submit(client, [line("a", ["x"])])
    seen = [batch["status"]]
    while seen[-1] not in ("completed", "failed"):
        status = get(client, batch["id"])["status"]
        if status != seen[-1]:
            seen.append(status)
        time.sleep(0.01)
    assert seen == ["validating", "in_progress", "finalizing", "completed"]
    done = get(client, batch["id"])
    assert done["created_at"] <= done["in_progress_at"] <= done["finalizing_at"]
    assert done["finalizing_at"] <= done["completed_at"]


def test_lines_over_a_limit_or_refused_by_inspection_go_to_the_error_file(
    server: FakeEmbeddingServer, client: httpx.Client
) -> None:
    server.configure(poison=["BADWORD"])
    lines = [
        line("ok", ["fine"]),
        line("eleven", [f"t{i}" for i in range(11)]),
        line("empty", [""]),
        line("poisoned", ["fine", "a BADWORD here"]),
        line("too-long", ["word " * 9000]),
    ]
    done = wait(client, submit(client, lines)["id"])
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 5, "completed": 1, "failed": 4}
    assert set(content(client, done["output_file_id"])) == {"ok"}
    errors = content(client, done["error_file_id"])
    codes = {
        k: (v["response"]["status_code"], v["response"]["body"]["error"]["code"])
        for k, v in errors.items()
    }
    assert codes == {
        "eleven": (400, "InvalidParameter"),
        "empty": (400, "InvalidParameter"),
        "poisoned": (400, "DataInspectionFailed"),
        "too-long": (400, "InvalidParameter"),
    }
    assert "larger than 10" in errors["eleven"]["response"]["body"]["error"]["message"]


def test_a_malformed_file_fails_validation_with_line_numbers(client: httpx.Client) -> None:
    wrong_url = line("b", ["x"])
    wrong_url["url"] = "/v1/chat/completions"
    lines: list[Any] = [line("a", ["x"]), wrong_url, line("a", ["y"]), {"method": "POST"}]
    done = wait(client, submit(client, lines)["id"])
    assert done["status"] == "failed" and done["failed_at"]
    assert done["output_file_id"] is None and done["error_file_id"] is None
    found = {(e["line"], e["code"]) for e in done["errors"]["data"]}
    assert {
        (2, "invalid_url"),
        (3, "duplicate_custom_id"),
        (4, "missing_required_parameter"),
    } <= found
    mixed = [line("a", ["x"]), {**line("b", ["y"]), "body": {"model": "other", "input": ["y"]}}]
    done = wait(client, submit(client, mixed)["id"])
    assert [e["code"] for e in done["errors"]["data"]] == ["mismatched_model"]


def test_injected_line_failures_are_500s_in_the_error_file(
    server: FakeEmbeddingServer, client: httpx.Client
) -> None:
    server.configure(batch_line_failure_rate=0.5, seed=7)
    done = wait(client, submit(client, [line(str(i), [f"t{i}"]) for i in range(40)])["id"])
    counts = done["request_counts"]
    assert counts["total"] == 40 and 0 < counts["failed"] < 40
    assert counts["completed"] + counts["failed"] == 40
    errors = content(client, done["error_file_id"])
    assert len(errors) == counts["failed"]
    assert {e["response"]["status_code"] for e in errors.values()} == {500}
    assert len(content(client, done["output_file_id"])) == counts["completed"]


def test_an_expired_job_keeps_what_ran_and_reports_the_rest(
    server: FakeEmbeddingServer, client: httpx.Client
) -> None:
    server.configure(batch_expire=True)
    done = wait(client, submit(client, [line(str(i), [f"t{i}"]) for i in range(6)])["id"])
    assert done["status"] == "expired" and done["expired_at"]
    assert done["request_counts"] == {"total": 6, "completed": 3, "failed": 3}
    assert set(content(client, done["output_file_id"])) == {"0", "1", "2"}
    errors = content(client, done["error_file_id"])
    assert {k: v["error"]["code"] for k, v in errors.items()} == dict.fromkeys(
        ("3", "4", "5"), "batch_expired"
    )
    assert all(v["response"] is None for v in errors.values())


def test_requests_the_api_refuses(server: FakeEmbeddingServer, client: httpx.Client) -> None:
    r = upload(client, [line("a", ["x"])], purpose="fine-tune")
    assert r.status_code == 400 and "purpose" in r.json()["error"]["message"]
    r = client.post("/files", json={"purpose": "batch"})
    assert r.status_code == 400 and "multipart" in r.json()["error"]["message"]
    file_id = upload(client, [line("a", ["x"])]).json()["id"]
    base = {"input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"}
    for change, word in [
        ({"endpoint": "/v1/chat/completions"}, "endpoint"),
        ({"completion_window": "1h"}, "completion_window"),
        ({"input_file_id": "file_nope"}, "No such file"),
    ]:
        r = client.post("/batches", json={**base, **change})
        assert r.status_code in (400, 404) and word in r.json()["error"]["message"], r.text
    assert client.get("/batches/batch_nope").status_code == 404
    with httpx.Client(base_url=server.url, timeout=5.0) as anonymous:
        r = anonymous.get(f"/v1/files/{file_id}")
        assert r.status_code == 401 and r.json()["error"]["code"] == "InvalidApiKey"
    # Both bases answer, and a file's description says what it holds.
    r = client.get(f"{server.url}/v1/files/{file_id}")
    assert r.status_code == 200 and r.json()["purpose"] == "batch" and r.json()["bytes"] > 0


def test_a_cancelled_batch_runs_nothing(server: FakeEmbeddingServer, client: httpx.Client) -> None:
    server.configure(batch_delay_s=60.0)
    batch = submit(client, [line("a", ["x"])])
    r = client.post(f"/batches/{batch['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert get(client, batch["id"])["status"] == "cancelled"
    assert server.batch_stats()["lines"] == 0
