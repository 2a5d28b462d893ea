"""Metrics, health and readiness over HTTP, and secrets kept out of the logs."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from pathlib import Path

import httpx
import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from fakeapi import FakeEmbeddingServer
from tests.conftest import API_KEY, Env, dashscope, migrate_db, running, wait_until
from tests.processes import WorkerProcess
from worker.app import Worker
from worker.config import AUTO_MAX_CONCURRENCY, HttpSettings
from worker.ops import logs
from worker.ops.probes import ProbeServer


def _events(n: int, start: int = 0) -> list[dict[str, object]]:
    return [{"id": f"o-{i}", "text": f"observable event {i}"} for i in range(start, start + n)]


async def _get(worker: Worker, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{worker.http_port}") as client:
        return await client.get(path)


async def _metrics(worker: Worker) -> dict[str, float]:
    """Samples by name and labels: ``events_consumed_total``, ``api_retries_total{cause=429}``."""
    text = (await _get(worker, "/metrics")).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix("embedding_worker_")
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{name}{{{labels}}}" if labels else name] = sample.value
    return out


async def test_metrics_move_as_events_flow(env: Env, fake_api: FakeEmbeddingServer) -> None:
    await migrate_db(env, 256)
    async with running(env.settings(dashscope(fake_api))) as worker:
        before = await _metrics(worker)
        assert before["events_consumed_total"] == 0
        assert before["circuit_state{state=closed}"] == 1
        assert before["concurrency_limit"] == 16  # where the limit starts for an API
        assert before["concurrency_ceiling"] == AUTO_MAX_CONCURRENCY  # no quota: the high limit
        assert before["texts_per_request_limit"] == 10  # DashScope's

        high = await env.produce([*_events(100), {"id": "bad", "text": ""}])
        await env.wait_for_offsets(high)
        after = await _metrics(worker)
    assert after["events_consumed_total"] == 101
    assert after["events_stored_total"] == 100
    assert after["events_dead_lettered_total{reason=empty_text}"] == 1
    assert after["texts_embedded_total"] == 100
    assert after["api_requests_total"] >= 10
    assert after["api_request_seconds_count{outcome=ok}"] == after["api_requests_total"]
    assert after["batch_texts_count"] == after["batches_total"] >= 10
    assert after["db_write_seconds_count"] == after["db_transactions_total"] >= 1
    assert after["end_to_end_seconds_count"] >= 100
    assert after["tokens_estimated_total"] > 0
    lags = {k: v for k, v in after.items() if k.startswith("consumer_lag{")}
    assert len(lags) == 4 and set(lags.values()) == {0.0}
    assert after["in_flight_events"] == 0


async def test_readiness_flips_on_auth_fault_and_postgres_outage(
    env: Env, fake_api: FakeEmbeddingServer
) -> None:
    await migrate_db(env, 256)
    provider = dashscope(fake_api, auth_retry_s=0.2)
    async with running(env.settings(provider)) as worker:
        assert (await _get(worker, "/healthz")).status_code == 200

        async def ready() -> bool:
            return (await _get(worker, "/readyz")).status_code == 200

        await wait_until(ready, 30, "never ready")

        fake_api.configure(auth_fault=True)
        await env.produce(_events(20))

        async def unready_auth() -> bool:
            r = await _get(worker, "/readyz")
            return r.status_code == 503 and r.json()["checks"]["provider_credentials"] is False

        await wait_until(unready_auth, 30, "readiness ignored the auth fault")
        assert (await _metrics(worker))["auth_fault"] == 1
        assert (await _get(worker, "/healthz")).status_code == 200, "alive while not ready"
        fake_api.configure(auth_fault=False)
        await wait_until(ready, 30, "readiness did not recover after the key was fixed")

        restart = asyncio.create_task(env.stack.restart_postgres(down_s=3))
        await env.produce(_events(20, start=100))
        saw: set[int] = set()
        while not restart.done():
            r = await _get(worker, "/readyz")
            saw.add(r.status_code)
            if r.status_code == 503:
                assert r.json()["checks"]["postgres"] is False
            await asyncio.sleep(0.05)
        await restart
        assert 503 in saw, "readiness did not report the Postgres outage"
        await wait_until(ready, 30, "readiness did not recover after Postgres came back")
    assert (await _get_unreachable(worker)) is None


async def _get_unreachable(worker: Worker) -> int | None:
    """After shutdown the port is closed."""
    try:
        return (await _get(worker, "/healthz")).status_code
    except httpx.TransportError:
        return None


def test_redaction_processor_masks_keys_and_passwords() -> None:
    out = io.StringIO()
    logs.configure("info", "json", file=out)
    try:
        structlog.get_logger("t").warning(
            "connect failed postgresql://app:hunter2@db:5432/x",
            dsn="postgresql://app:hunter2@db:5432/x?sslmode=require",
            header="Authorization: Bearer sk-abcdef0123456789",
            key="sk-abcdef0123456789",
        )
    finally:
        logs.configure("info", "json")
    line = out.getvalue()
    assert "hunter2" not in line and "sk-abcdef0123456789" not in line
    entry = json.loads(line)
    assert entry["dsn"] == "postgresql://app:***@db:5432/x?sslmode=require"
    assert "***" in entry["key"] and "***" in entry["header"]


async def test_a_running_worker_never_logs_its_secrets(
    env: Env, fake_api: FakeEmbeddingServer, tmp_path: Path
) -> None:
    await migrate_db(env, 256)
    dsn = env.dsn.replace("postgresql://postgres:@", "postgresql://postgres:pg-pass-7531@")
    settings_env = env.worker_env(dashscope(fake_api), postgres={"dsn": dsn})
    assert settings_env["EMBEDDING_WORKER_PROVIDER__API_KEY"] == API_KEY
    settings_env["EMBEDDING_WORKER_LOG_LEVEL"] = "debug"
    worker = await WorkerProcess(settings_env, tmp_path / "w.log").start()
    fake_api.configure(rate_429=0.5, retry_after_s=0.01)
    high = await env.produce([*_events(30), {"id": "x", "text": ""}])
    await env.wait_for_offsets(high)
    assert await worker.terminate() == 0
    log = worker.log()
    assert '"event dead-lettered"' in log and "retrying" in log
    assert API_KEY not in log and "pg-pass-7531" not in log
    # Every line is JSON, the libraries' debug records (aiokafka, asyncpg) included.
    loggers = {json.loads(line)["logger"] for line in log.splitlines()}
    assert any(name.startswith("aiokafka") for name in loggers), loggers


SECRETS = ("sk-deep0123456789", "hunter2-deep", "tok.deep-42", "sk-key0123456789")


def test_every_record_is_one_json_line_with_no_secret_at_any_depth() -> None:
    """structlog events and stdlib records of libraries alike: nested fields, dict keys,
    exception objects, tracebacks and a record's %-args are all redacted."""
    key, password, token, key_in_key = SECRETS
    dsn = f"postgresql://app:{password}@db:5432/x"
    out = io.StringIO()
    logs.configure("info", "json", file=out)
    try:
        log = structlog.get_logger("worker.test")
        log.warning(
            "nested",
            request={"headers": [{"auth": (f"Bearer {token}",)}], "pool": {"dsn": {"x": dsn}}},
            keys={key_in_key: "value"},
            error=RuntimeError(f"refused key {key}"),
        )
        try:
            raise ConnectionError(f"cannot reach {dsn}")
        except ConnectionError as exc:
            log.exception("store failed")
            logging.getLogger("asyncpg.pool").error("reconnect failed", exc_info=exc)
        logging.getLogger("aiokafka.conn").warning("auth with %s as %s", f"Bearer {token}", key)
        logging.getLogger("asyncio").error("Task exception was never retrieved: %r", dsn)
        logging.getLogger("aiokafka.consumer").info("INFO chatter stays out at level info")
    finally:
        logs.configure("info", "json")
    text = out.getvalue()
    entries = [json.loads(line) for line in text.splitlines()]
    assert [(e["logger"], e["level"]) for e in entries] == [
        ("worker.test", "warning"),
        ("worker.test", "error"),
        ("asyncpg.pool", "error"),
        ("aiokafka.conn", "warning"),
        ("asyncio", "error"),
    ]
    assert all(e["timestamp"] for e in entries)
    assert "ConnectionError: cannot reach postgresql://app:***@" in entries[2]["exception"]
    assert entries[3]["event"] == "auth with Bearer *** as sk-***"
    assert entries[0]["request"]["pool"]["dsn"]["x"] == "postgresql://app:***@db:5432/x"
    for secret in SECRETS:
        assert secret not in text


def test_library_loggers_are_quiet_below_warning_unless_debug() -> None:
    out = io.StringIO()
    try:
        logs.configure("info", "json", file=out)
        logging.getLogger("aiokafka.consumer").info("chatter at info")
        structlog.get_logger("worker.test").info("own info at info")
        logs.configure("debug", "json", file=out)
        logging.getLogger("aiokafka.consumer").debug("chatter at debug")
        logs.configure("error", "json", file=out)
        logging.getLogger("aiokafka.consumer").warning("warning at error")
        structlog.get_logger("worker.test").warning("own warning at error")
        structlog.get_logger("worker.test").error("own error at error")
    finally:
        logs.configure("info", "json")
    events = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
    assert events == ["own info at info", "chatter at debug", "own error at error"]


# A real library's own records, a Python warning and asyncio's unretrieved-task report, in a
# process of their own: stderr must hold nothing but JSON lines.
_LIBRARY_NOISE = """
import asyncio, gc, warnings
from aiokafka import AIOKafkaProducer
from worker.ops import logs

logs.configure("info", "json")
warnings.warn("a library's warning")

async def failing() -> None:
    raise ValueError("lost task with Bearer tok.deep-42")

async def main() -> None:
    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1")
    try:
        await producer.start()
    except Exception:
        pass
    task = asyncio.ensure_future(failing())
    await asyncio.sleep(0.05)
    del task
    gc.collect()

asyncio.run(main())
"""


async def test_library_output_in_a_real_process_is_json_lines() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _LIBRARY_NOISE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    entries = [json.loads(line) for line in err.decode().splitlines()]
    loggers = {e["logger"] for e in entries}
    assert "py.warnings" in loggers and "asyncio" in loggers
    assert any(name.startswith("aiokafka") for name in loggers), loggers
    assert "tok.deep-42" not in err.decode()


async def test_probe_port_bind_address_is_a_setting_reachable_off_loopback_by_default() -> None:
    """Kubelet probes and Prometheus connect to the pod IP, not to 127.0.0.1: the default
    (0.0.0.0) answers on another local address (127.0.0.2 stands in for the pod IP), and
    http.host=127.0.0.1 does not."""
    for host, reachable in ((HttpSettings().host, True), ("127.0.0.1", False)):
        server = ProbeServer(CollectorRegistry(), lambda: {"ok": True})
        port = await server.start(host, 0)
        try:
            async with httpx.AsyncClient() as client:
                try:
                    status = (await client.get(f"http://127.0.0.2:{port}/healthz")).status_code
                except httpx.ConnectError:
                    status = None
        finally:
            await server.stop()
        assert (status == 200) is reachable, (host, status)
