"""Start-up faults as an operator meets them: the worker as a real process, its exit code and
what it prints. One test (or one parametrized case) per row of the table in
docs/operations.md, "Start-up faults"."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fakeapi import FakeEmbeddingServer
from tests.conftest import Env, dashscope, migrate_db, wait_until
from tests.processes import WorkerProcess, cli
from worker.app import Worker
from worker.tools.devstack.tansu import TansuBroker

PASSWORD = "pw-Zq7xK93secret"
DSN_VARIABLE = "postgres.dsn (EMBEDDING_WORKER_POSTGRES__DSN)"


def assert_one_clear_line(code: int, out: str, err: str, *expected: str) -> None:
    """Exit 2, the message last on stderr naming what to fix, no traceback, no password."""
    assert code == 2, err
    assert "Traceback" not in err and "Unclosed" not in err, err
    _, found, message = err.partition("embedding-worker: ")
    assert found, err
    for text in expected:
        assert text in message, err
    assert PASSWORD not in out + err


@contextlib.asynccontextmanager
async def worker_process(settings: dict[str, str], log: Path) -> AsyncIterator[WorkerProcess]:
    """A worker subprocess that is killed if the test leaves it running (a failed test)."""
    proc = await WorkerProcess(settings, log).start()
    try:
        yield proc
    finally:
        if proc.alive():
            await proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- malformed settings: refused before anything starts, by every command --------------

MALFORMED: list[tuple[str, dict[str, str], tuple[str, ...]]] = [
    (
        "dsn-port-not-a-number",
        {"EMBEDDING_WORKER_POSTGRES__DSN": f"postgresql://app:{PASSWORD}@db:54x2/app"},
        (DSN_VARIABLE, "not a number"),
    ),
    (
        "dsn-port-out-of-range",
        {"EMBEDDING_WORKER_POSTGRES__DSN": f"postgresql://app:{PASSWORD}@db:99999/app"},
        (DSN_VARIABLE, "out of range"),
    ),
    (
        "dsn-wrong-scheme",
        {"EMBEDDING_WORKER_POSTGRES__DSN": f"mysql://app:{PASSWORD}@db/app"},
        (DSN_VARIABLE, "postgresql://"),
    ),
    (
        "dsn-bad-sslmode",
        {"EMBEDDING_WORKER_POSTGRES__DSN": f"postgresql://app:{PASSWORD}@db/app?sslmode=on"},
        (DSN_VARIABLE, "sslmode"),
    ),
    (
        "dsn-keyword-style",
        {"EMBEDDING_WORKER_POSTGRES__DSN": f"host=db dbname=app user=app password={PASSWORD}"},
        (DSN_VARIABLE, "URI form"),
    ),
    (
        "dsn-libpq-only-option",
        {"EMBEDDING_WORKER_POSTGRES__DSN": f"postgresql://app:{PASSWORD}@db/app?connect_timeout=5"},
        (DSN_VARIABLE, "connect_timeout"),
    ),
    (
        "dsn-unencoded-at-in-password",
        {"EMBEDDING_WORKER_POSTGRES__DSN": f"postgresql://app:{PASSWORD}@x@db/app"},
        (DSN_VARIABLE, "%40"),
    ),
    (
        "dsn-missing-certificate-file",
        {
            "EMBEDDING_WORKER_POSTGRES__DSN": (
                f"postgresql://app:{PASSWORD}@db/app?sslmode=verify-full&sslrootcert=/no/ca.pem"
            )
        },
        (DSN_VARIABLE, "cannot be read"),
    ),
    (
        "kafka-bootstrap-not-host-port",
        {"EMBEDDING_WORKER_KAFKA__BOOTSTRAP_SERVERS": "kafka://broker:9092"},
        ("kafka.bootstrap_servers (EMBEDDING_WORKER_KAFKA__BOOTSTRAP_SERVERS)", "host:port"),
    ),
    (
        "json-section",
        {"EMBEDDING_WORKER_KAFKA": "{bad"},
        ("kafka (EMBEDDING_WORKER_KAFKA)", "not valid JSON"),
    ),
    (
        "json-nested-value",
        {
            "EMBEDDING_WORKER_ANALYSIS__NAMESPACES": "{",
            "EMBEDDING_WORKER_POSTGRES__DSN": f"postgresql://app:{PASSWORD}@db/app",
        },
        ("analysis.namespaces (EMBEDDING_WORKER_ANALYSIS__NAMESPACES)", "not valid JSON"),
    ),
    (
        "json-with-a-secret-inside",
        {"EMBEDDING_WORKER_POSTGRES": f'{{"dsn": "postgresql://app:{PASSWORD}@db/app"'},
        ("postgres (EMBEDDING_WORKER_POSTGRES)", "not valid JSON"),
    ),
    (
        "base-url-not-http",
        {
            "EMBEDDING_WORKER_PROVIDER__KIND": "openai",
            "EMBEDDING_WORKER_PROVIDER__API_KEY": "sk-test-0123456789",
            "EMBEDDING_WORKER_PROVIDER__BASE_URL": "localhost:8000/v1",
        },
        ("provider.base_url (EMBEDDING_WORKER_PROVIDER__BASE_URL)", "http"),
    ),
]


@pytest.mark.parametrize(
    ("env", "expected"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
@pytest.mark.parametrize("command", ["run", "migrate"])
async def test_malformed_setting_exits_2_with_one_line(
    command: str, env: dict[str, str], expected: tuple[str, ...]
) -> None:
    code, out, err = await cli(command, **env)
    assert_one_clear_line(code, out, err, *expected)
    assert len(err.strip().splitlines()) == 2  # "invalid configuration:" and the setting


# ---- the server answers and refuses: configuration, not an outage ---------------------


def with_database(dsn: str, database: str) -> str:
    before, _, after = dsn.partition("?")
    return f"{before.rsplit('/', 1)[0]}/{database}" + (f"?{after}" if after else "")


def with_user(dsn: str, user: str) -> str:
    scheme, _, rest = dsn.partition("://")
    return f"{scheme}://{user}:{PASSWORD}@{rest.split('@', 1)[-1]}"


@contextlib.asynccontextmanager
async def password_role(env: Env, role: str, password: str) -> AsyncIterator[None]:
    """A role that must give its password (the embedded server listens on a Unix socket and
    trusts everyone): a line for this role alone goes first in pg_hba.conf (the other tests'
    roles keep trust), and is taken out again after."""
    conn = await asyncpg.connect(env.dsn)
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        hba = Path(await conn.fetchval("SHOW hba_file"))
        before = await asyncio.to_thread(hba.read_text)
        line = f"local all {role} scram-sha-256\n"
        await asyncio.to_thread(hba.write_text, line + before)
        assert await conn.fetchval("SELECT pg_reload_conf()")
        try:
            yield
        finally:
            await asyncio.to_thread(hba.write_text, before)
            await conn.fetchval("SELECT pg_reload_conf()")
            await conn.execute(f"DROP ROLE {role}")
    finally:
        await conn.close()


@pytest.mark.parametrize("command", ["run", "migrate"])
async def test_a_wrong_postgres_password_exits_2_without_showing_it(env: Env, command: str) -> None:
    """The server answers and refuses the password: configuration (exit 2, naming the
    setting and the server's reason), not an outage to wait out; the password never shows."""
    async with password_role(env, "pw_role", "right-Pw-3x"):
        scheme, _, rest = env.dsn.partition("://")
        dsn = f"{scheme}://pw_role:{PASSWORD}@{rest.split('@', 1)[-1]}"
        code, out, err = await cli(
            command,
            EMBEDDING_WORKER_POSTGRES__DSN=dsn,
            EMBEDDING_WORKER_KAFKA__BOOTSTRAP_SERVERS=env.stack.bootstrap,
            EMBEDDING_WORKER_HTTP__HOST="127.0.0.1",
            EMBEDDING_WORKER_HTTP__PORT="0",
        )
    assert_one_clear_line(
        code, out, err, DSN_VARIABLE, "refused the connection", "password authentication failed"
    )


@pytest.mark.parametrize("refusal", ["no-such-database", "no-such-role", "unknown-setting"])
@pytest.mark.parametrize("command", ["run", "migrate"])
async def test_postgres_refusing_the_connection_exits_2(
    env: Env, refusal: str, command: str
) -> None:
    if refusal == "no-such-database":
        dsn, because = with_database(env.dsn, "no_such_db"), '"no_such_db" does not exist'
    elif refusal == "no-such-role":
        dsn, because = with_user(env.dsn, "no_such_role"), '"no_such_role" does not exist'
    else:  # asyncpg sends a query parameter it does not know to the server as a setting
        separator = "&" if "?" in env.dsn else "?"
        dsn = f"{env.dsn}{separator}no_such_setting=1"
        because = 'unrecognized configuration parameter "no_such_setting"'
    code, out, err = await cli(
        command,
        EMBEDDING_WORKER_POSTGRES__DSN=dsn,
        EMBEDDING_WORKER_KAFKA__BOOTSTRAP_SERVERS=env.stack.bootstrap,
        EMBEDDING_WORKER_HTTP__HOST="127.0.0.1",
        EMBEDDING_WORKER_HTTP__PORT="0",
    )
    assert_one_clear_line(code, out, err, DSN_VARIABLE, "refused the connection", because)


# ---- the probe port ---------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["port-in-use", "address-not-of-this-host"])
async def test_http_port_in_use_exits_2_before_anything_starts(fault: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host, port = "127.0.0.1", taken.getsockname()[1]
        if fault == "address-not-of-this-host":
            host = "192.0.2.1"  # TEST-NET-1: bound nowhere, so not on this machine either
        code, out, err = await cli(
            "run",
            EMBEDDING_WORKER_HTTP__HOST=host,
            EMBEDDING_WORKER_HTTP__PORT=str(port),
            # Nothing listens here: had the worker gone on, it would wait for Postgres.
            EMBEDDING_WORKER_POSTGRES__DSN=f"postgresql://app:{PASSWORD}@127.0.0.1:{free_port()}/x",
        )
    assert_one_clear_line(code, out, err, "http.port", f"{host}:{port}")
    assert "waiting for postgres" not in err


# ---- unreachable services: wait, not ready, SIGTERM exits 0 -----------------------------


def log_entries(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


async def readyz(port: int) -> tuple[int, dict[str, Any]] | None:
    try:
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    except httpx.TransportError:
        return None
    return answer.status_code, answer.json()


async def in_flight_events(port: int) -> float | None:
    """The worker's fetched-but-unstored count from /metrics, or None before it answers."""
    try:
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    except httpx.TransportError:
        return None
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            if sample.name == "embedding_worker_in_flight_events":
                return sample.value
    return None


async def test_postgres_unreachable_at_start_waits_not_ready_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    http_port = free_port()
    settings = {
        "EMBEDDING_WORKER_POSTGRES__DSN": f"postgresql://app:{PASSWORD}@127.0.0.1:{free_port()}/x",
        "EMBEDDING_WORKER_HTTP__HOST": "127.0.0.1",
        "EMBEDDING_WORKER_HTTP__PORT": str(http_port),
    }
    seen: dict[str, Any] = {}
    async with worker_process(settings, tmp_path / "worker.log") as proc:

        async def waiting() -> bool:
            assert proc.alive(), proc.log()
            answer = await readyz(http_port)
            attempts = [
                e for e in log_entries(proc.log()) if e.get("event") == "waiting for postgres"
            ]
            if answer is None or len(attempts) < 2:
                return False
            seen["readyz"] = answer
            return True

        await wait_until(waiting, 60, "the worker did not wait for Postgres")
        assert seen["readyz"] == (
            503,
            {"ready": False, "checks": {"started": False, "postgres": False}},
        )
        assert await proc.terminate(within_s=30) == 0
        log = proc.log()
    assert "Traceback" not in log, log
    assert PASSWORD not in log
    entries = log_entries(log)
    assert {e["level"] for e in entries if e.get("event") == "waiting for postgres"} == {"warning"}
    assert [e for e in entries if e["level"] in ("error", "critical")] == []


async def test_kafka_unreachable_at_start_waits_not_ready_and_stops_on_sigterm(
    env: Env, tmp_path: Path
) -> None:
    await migrate_db(env, 512)
    http_port = free_port()
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    settings = env.worker_env(kafka={"bootstrap_servers": dead}, http={"port": http_port})
    seen: dict[str, Any] = {}
    async with worker_process(settings, tmp_path / "worker.log") as proc:

        async def waiting() -> bool:
            assert proc.alive(), proc.log()
            answer = await readyz(http_port)
            attempts = [e for e in log_entries(proc.log()) if e.get("event") == "waiting for kafka"]
            if answer is None or len(attempts) < 2:
                return False
            seen["readyz"] = answer
            return True

        await wait_until(waiting, 60, "the worker did not wait for Kafka")
        status, body = seen["readyz"]
        assert status == 503
        assert body["checks"]["kafka"] is False and body["checks"]["postgres"] is True
        assert await proc.terminate(within_s=30) == 0
        log = proc.log()
    assert "Traceback" not in log, log
    entries = log_entries(log)
    attempt = next(e for e in entries if e.get("event") == "waiting for kafka")
    assert attempt["level"] == "warning" and attempt["bootstrap_servers"] == dead
    # One warning per attempt, not an error from aiokafka besides it.
    assert [e for e in entries if e["level"] in ("error", "critical")] == []


# ---- SIGTERM while the provider refuses the key -------------------------------------------


LABELS = """
[namespaces.news.classify]
[[namespaces.news.classify.labels]]
name = "Sports"
description = "Sports: athletes, teams, matches and tournaments."
[[namespaces.news.classify.labels]]
name = "Cooking"
description = "Cooking: recipes, ingredients and meals."
"""


@pytest.mark.parametrize("during", ["consuming", "preparing-labels"])
async def test_sigterm_while_the_provider_answers_401_exits_0_cleanly(
    env: Env, fake_api: FakeEmbeddingServer, tmp_path: Path, during: str
) -> None:
    """The work held by the auth fault cannot be embedded: the drain does not wait for it
    (nor does the start-up embedding of the label sets), and nothing is left half-closed."""
    fake_api.configure(auth_fault=True)
    await migrate_db(env, 64)
    await env.produce([{"id": f"doc-{i}", "text": f"text number {i}"} for i in range(50)])
    extra: dict[str, Any] = {}
    if during == "preparing-labels":
        (tmp_path / "analysis.toml").write_text(LABELS)
        extra["analysis"] = {
            "file": str(tmp_path / "analysis.toml"),
            "classifications_topic": env.dlq.replace(".dlq", ".classifications"),
            "anomalies_topic": env.dlq.replace(".dlq", ".anomalies"),
        }
    provider = dashscope(fake_api, 64, on_auth_fault="wait")
    http_port = free_port()
    settings = env.worker_env(provider, http={"port": http_port}, **extra)
    async with worker_process(settings, tmp_path / "worker.log") as proc:

        async def holding() -> bool:
            assert proc.alive(), proc.log()
            if "provider refuses the credentials" not in proc.log():
                return False
            # The first 401 can come before the last partitions are fetched (Kafka).
            return during != "consuming" or await in_flight_events(http_port) == 50

        await wait_until(holding, 60, "the worker did not hold its work on the 401s")
        # The contract: out within the drain timeout (30 s), not after it.
        assert await proc.terminate(within_s=30) == 0
        log = proc.log()
    for bad in ("Traceback", "Task was destroyed but it is pending", "Event loop is closed"):
        assert bad not in log, log
    entries = log_entries(log)
    errors = [e for e in entries if e.get("level") in ("error", "critical")]
    assert all("exception" not in e for e in errors), errors
    if during == "consuming":
        [drained] = [e for e in entries if e.get("event", "").startswith("stopping with unstored")]
        assert drained["provider_refuses_key"] is True and drained["events"] == 50
        assert any(e.get("event") == "worker stopped" for e in entries)


async def test_postgres_unreachable_for_a_one_shot_command_exits_5() -> None:
    """``run`` waits for Postgres (test_crashes.py); a command run once says so and stops."""
    code, out, err = await cli(
        "migrate",
        EMBEDDING_WORKER_POSTGRES__DSN=f"postgresql://app:{PASSWORD}@127.0.0.1:{free_port()}/x",
    )
    assert code == 5, err
    assert "Traceback" not in err, err
    assert err.startswith(f"embedding-worker: {DSN_VARIABLE}: postgres is unreachable"), err
    assert PASSWORD not in out + err


@pytest.mark.parametrize("command", ["produce", "dead-letters"])
async def test_kafka_unreachable_for_a_one_shot_command_exits_5(
    command: str, tmp_path: Path
) -> None:
    """As for Postgres: one line naming the setting, exit 5, and no client left unclosed."""
    events = tmp_path / "events.jsonl"
    events.write_text('{"id": "a", "text": "hello"}\n')
    args = [command, str(events)] if command == "produce" else [command]
    code, _, err = await cli(
        *args, EMBEDDING_WORKER_KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}"
    )
    assert code == 5, err
    assert "Traceback" not in err and "Unclosed" not in err, err
    assert (
        "embedding-worker: kafka.bootstrap_servers (EMBEDDING_WORKER_KAFKA__BOOTSTRAP_SERVERS): "
        "no broker answers" in err
    ), err


@pytest.mark.parametrize("command", ["produce", "run"])
async def test_a_broker_refusing_the_idempotent_producer_exits_2_naming_the_setting(
    command: str, env: Env, tmp_path: Path
) -> None:
    """Tansu answers InitProducerId with an error (whichever broker the suite runs on, this
    test starts one): the worker and a one-shot command say which setting to change."""
    await migrate_db(env, 512)  # the local model's
    broker = TansuBroker()
    await broker.start(tmp_path)
    try:
        events = tmp_path / "events.jsonl"
        events.write_text('{"id": "a", "text": "hello"}\n')
        code, out, err = await cli(
            *([command, str(events)] if command == "produce" else [command]),
            EMBEDDING_WORKER_KAFKA__BOOTSTRAP_SERVERS=broker.bootstrap,
            EMBEDDING_WORKER_KAFKA__IDEMPOTENT_PRODUCER="true",
            EMBEDDING_WORKER_POSTGRES__DSN=env.dsn,
            EMBEDDING_WORKER_PROVIDER__KIND="local",
        )
    finally:
        await broker.stop()
    assert_one_clear_line(
        code,
        out,
        err,
        "refuses the idempotent producer",
        "EMBEDDING_WORKER_KAFKA__IDEMPOTENT_PRODUCER",
    )


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def test_kafka_coming_up_late_is_used(env: Env, fake_api: FakeEmbeddingServer) -> None:
    """No broker at the bootstrap address, then one: the worker starts by itself and works.

    The late "broker" is a TCP relay to the stack's broker, opened on the bootstrap port once
    the worker is waiting (the broker's metadata then sends the clients to the broker itself).
    """
    await migrate_db(env, 64)
    high = await env.produce([{"id": f"doc-{i}", "text": f"text number {i}"} for i in range(20)])
    port = free_port()
    broker_host, broker_port = env.stack.bootstrap.rsplit(":", 1)
    settings = env.settings(
        dashscope(fake_api, 64), kafka={"bootstrap_servers": f"127.0.0.1:{port}"}
    )
    worker = Worker(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    relay: asyncio.Server | None = None
    try:

        async def waiting_for_kafka() -> bool:
            assert not task.done(), "the worker gave up instead of waiting for Kafka"
            return worker.checks() == {"started": False, "postgres": True, "kafka": False}

        await wait_until(waiting_for_kafka, 60, "the worker did not report waiting for Kafka")

        async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection(broker_host, int(broker_port))
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        relay = await asyncio.start_server(forward, "127.0.0.1", port)
        await env.wait_for_offsets(high, seconds=60)
        assert worker.pipeline is not None and worker.pipeline.ready
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        if relay is not None:
            relay.close()
