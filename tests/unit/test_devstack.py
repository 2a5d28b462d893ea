"""The dev stack's broker choice and its start-up errors (no broker is started here)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from worker.tools.devstack import BROKER_ENV, DevStack, make_broker
from worker.tools.devstack.kafka import KafkaBroker
from worker.tools.devstack.tansu import TansuBroker


def test_the_setting_chooses_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BROKER_ENV, raising=False)
    assert isinstance(make_broker(), TansuBroker)
    monkeypatch.setenv(BROKER_ENV, "Kafka")
    broker = make_broker()
    assert isinstance(broker, KafkaBroker) and broker.replication_factor == 1
    cluster = make_broker("kafka-cluster")
    assert isinstance(cluster, KafkaBroker) and cluster.replication_factor == 3


def test_an_unknown_backend_names_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BROKER_ENV, "redpanda")
    with pytest.raises(RuntimeError, match="expected one of tansu, kafka, kafka-cluster"):
        make_broker()


def test_only_tansu_gets_workarounds() -> None:
    assert TansuBroker().client_settings().keys() == {
        "bootstrap_servers",
        "fetch_max_wait_ms",
        "idempotent_producer",
    }
    assert KafkaBroker().client_settings().keys() == {"bootstrap_servers"}


@pytest.mark.parametrize("tool", ["java", "mvn"])
async def test_a_missing_tool_is_named_with_what_to_install(
    tool: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Java is needed at every start, Maven only while the classpath is not cached."""
    from worker.tools.devstack import kafka

    monkeypatch.setattr(kafka, "_cached_classpath", lambda: (tmp_path / "cp.txt", None))
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda t: None if t == tool else real_which(t))
    stack = DevStack("kafka")
    try:
        with pytest.raises(RuntimeError, match=f"`{tool}` is not on PATH.*apt-get install"):
            await stack.broker.start(stack.tmp)
    finally:
        await stack.stop()
