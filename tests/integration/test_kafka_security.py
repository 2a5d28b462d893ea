"""The worker on SASL/TLS listeners (Apache Kafka only: Tansu has none). The single-node dev
stack has SASL_SSL with SCRAM-SHA-512 and a certificate from a CA made at its start, and
SASL_PLAINTEXT with PLAIN (``worker/tools/devstack/kafka.py``).

The ``kafka.*`` security settings carry events end to end; a wrong password or a broker
certificate from a CA the worker does not trust is a configuration fault: named (setting and
cause), not ready, nothing consumed or dead-lettered, no traceback, no crash loop; a one-shot
command exits 2 with one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fakeapi import FakeEmbeddingServer
from tests.conftest import Env, migrate_db, running, wait_until
from tests.integration.test_crashes import DIM, check_store, corpus, provider
from tests.integration.test_startup_faults import log_entries, readyz, worker_process
from tests.processes import cli
from worker.config import environment_for
from worker.tools.devstack import DevStack
from worker.tools.devstack.kafka import KafkaBroker, Secured
from worker.tools.devstack.tls import make_ca

pytestmark = pytest.mark.kafka_only

WRONG = "not-the-password"


def secured(stack: DevStack) -> Secured:
    broker = stack.broker
    if not isinstance(broker, KafkaBroker) or broker.secured is None:
        pytest.skip("the secured listeners are on the single-node Apache Kafka with openssl")
    return broker.secured


def free_port() -> int:
    from worker.tools.devstack import free_port as port

    return port()


@pytest.mark.parametrize("protocol", ["SASL_SSL", "SASL_PLAINTEXT"])
async def test_worker_embeds_over_sasl_listeners(
    env: Env, fake_api: FakeEmbeddingServer, protocol: str
) -> None:
    access = secured(env.stack)
    await migrate_db(env, DIM)
    records, texts = corpus(300, bad_every=100)
    positions = await env.produce_records(records)
    settings = env.settings(provider(fake_api), kafka=access.client_settings(protocol))
    async with running(settings) as worker:
        high: dict[int, int] = {}
        for p, o in positions:
            high[p] = max(high.get(p, -1), o)
        await env.wait_for_offsets(high)
        assert worker.pipeline is not None
        stats = worker.pipeline.stats
    await check_store(env, texts)  # 297 stored once, version 1
    letters = await env.dead_letters(expected=3)  # written over the secured listener too
    assert len(letters) == 3 and {x["reason"] for x in letters} == {"empty_text"}
    assert stats.stored == len(texts) == 297 and sum(stats.dead_lettered.values()) == 3


def _faulty(access: Secured, fault: str, tmp: Path) -> tuple[dict[str, Any], str]:
    """SASL_SSL settings with one fault, and what the message must name."""
    settings = access.client_settings("SASL_SSL")
    if fault == "wrong-password":
        settings["sasl_password"] = WRONG
        return settings, "refused to authenticate 'worker' with SCRAM-SHA-512"
    other_ca, _ = make_ca(tmp / "other-ca", "some-other-ca")
    settings["ssl_cafile"] = str(other_ca)
    return settings, "is not trusted"


@pytest.mark.parametrize("fault", ["wrong-password", "untrusted-certificate"])
async def test_refused_credentials_are_named_not_ready_and_not_a_crash(
    env: Env, fake_api: FakeEmbeddingServer, tmp_path: Path, fault: str
) -> None:
    access = secured(env.stack)
    await migrate_db(env, DIM)
    records, _ = corpus(50, bad_every=10)
    await env.produce_records(records)
    kafka, cause = _faulty(access, fault, tmp_path)
    http_port = free_port()
    settings = env.worker_env(provider(fake_api), kafka=kafka, http={"port": http_port})
    seen: dict[str, Any] = {}
    async with worker_process(settings, tmp_path / "worker.log") as proc:

        async def refused_twice() -> bool:
            assert proc.alive(), proc.log()  # waiting, not exiting (no crash loop)
            answer = await readyz(http_port)
            named = [e for e in log_entries(proc.log()) if e.get("event", "").startswith("kafka")]
            refusals = [
                e for e in named if e["event"] == "kafka refuses the worker: fix the settings"
            ]
            if answer is None or len(refusals) < 2:
                return False
            seen["readyz"], seen["refusals"] = answer, refusals
            return True

        await wait_until(refused_twice, 60, "the worker did not report the refusal")
        status, body = seen["readyz"]
        assert status == 503
        assert body["checks"]["kafka"] is False and body["checks"]["kafka_credentials"] is False
        first, again = seen["refusals"][:2]
        assert first["level"] == "error" and again["level"] == "warning"  # once loud, then not
        assert cause in first["cause"]
        assert fake_api.stats()["requests"] == 0  # nothing was read, so nothing embedded
        assert await proc.terminate(within_s=30) == 0
        log = proc.log()
    assert "Traceback" not in log, log
    assert WRONG not in log and access.scram_password not in log
    assert await env.stored_offsets() == {}
    assert await env.dead_letters(expected=0, seconds=2) == []


@pytest.mark.parametrize("fault", ["wrong-password", "untrusted-certificate"])
async def test_one_shot_command_refused_by_the_broker_exits_2_with_one_line(
    env: Env, tmp_path: Path, fault: str
) -> None:
    access = secured(env.stack)
    kafka, cause = _faulty(access, fault, tmp_path)
    events = tmp_path / "events.jsonl"
    events.write_text('{"id": "a-1", "text": "Hello"}\n')
    code, out, err = await cli(
        "produce",
        str(events),
        **environment_for({"kafka": {**kafka, "input_topic": env.topic}}),
        EMBEDDING_WORKER_POSTGRES__DSN=env.dsn,
    )
    assert code == 2, err
    assert "Traceback" not in err, err
    assert err.strip().count("\n") == 0, err  # one line
    assert err.startswith("embedding-worker: kafka.") and cause in err, err
    assert WRONG not in out + err
