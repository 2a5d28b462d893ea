"""aiokafka clients built from settings (SASL/TLS pass through for real clusters)."""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.helpers import create_ssl_context

from worker.config import KafkaSettings


def common_options(k: KafkaSettings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "bootstrap_servers": k.bootstrap_servers,
        "client_id": k.client_id,
        "security_protocol": k.security_protocol,
    }
    if k.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=k.ssl_cafile, certfile=k.ssl_certfile, keyfile=k.ssl_keyfile
        )
    if k.sasl_mechanism is not None:
        options["sasl_mechanism"] = k.sasl_mechanism
        options["sasl_plain_username"] = k.sasl_username
        if k.sasl_password is not None:
            options["sasl_plain_password"] = k.sasl_password.get_secret_value()
    return options


def make_consumer(k: KafkaSettings) -> AIOKafkaConsumer:
    """Manual offsets: Postgres holds the truth, Kafka's copy is for lag monitoring."""
    return AIOKafkaConsumer(
        group_id=k.group_id,
        enable_auto_commit=False,
        auto_offset_reset=k.auto_offset_reset,
        session_timeout_ms=k.session_timeout_ms,
        heartbeat_interval_ms=k.heartbeat_interval_ms,
        max_poll_records=k.max_poll_records,
        max_partition_fetch_bytes=k.max_partition_fetch_bytes,
        fetch_max_bytes=k.fetch_max_bytes,
        **common_options(k),
    )


def make_producer(k: KafkaSettings) -> AIOKafkaProducer:
    # Not idempotent: results and dead letters are at-least-once by design, and the
    # idempotent producer is not available on every broker (see DESIGN.md).
    return AIOKafkaProducer(acks="all", linger_ms=5, **common_options(k))
