"""aiokafka clients built from settings (SASL/TLS pass through for real clusters)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.helpers import create_ssl_context

from worker.config import KafkaSettings

AIOKAFKA_MAX_REQUEST_SIZE = 1_048_576


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
    """Manual offsets: Postgres holds the truth, Kafka's copy is for lag monitoring.

    ``fetch_max_wait_ms`` defaults to 100 (aiokafka's is 500): a broker answers a fetch as
    soon as it has data, and 100 ms costs a real cluster at most ten empty fetches a second
    per broker while idle. The embedded Tansu broker holds a fetch for the whole wait whenever
    the partition was empty at the request; its clients ask for a shorter wait
    (``worker/devstack/tansu.py``, the one place for its workarounds).
    """
    return AIOKafkaConsumer(
        group_id=k.group_id,
        fetch_max_wait_ms=k.fetch_max_wait_ms,
        enable_auto_commit=False,
        auto_offset_reset=k.auto_offset_reset,
        session_timeout_ms=k.session_timeout_ms,
        heartbeat_interval_ms=k.heartbeat_interval_ms,
        max_poll_records=k.max_poll_records,
        max_partition_fetch_bytes=k.max_partition_fetch_bytes,
        fetch_max_bytes=k.fetch_max_bytes,
        **common_options(k),
    )


def make_producer(k: KafkaSettings, max_request_size: int = 0) -> AIOKafkaProducer:
    """Not idempotent: results and dead letters are at-least-once by design, and the
    idempotent producer is not available on every broker (see DESIGN.md). Requests may
    be as large as a dead letter (``dlq_max_message_bytes``) or ``max_request_size``,
    and never less than aiokafka's default (1 MiB)."""
    return AIOKafkaProducer(
        acks="all",
        linger_ms=5,
        max_request_size=max(AIOKAFKA_MAX_REQUEST_SIZE, k.dlq_max_message_bytes, max_request_size),
        **common_options(k),
    )


Client = TypeVar("Client", AIOKafkaConsumer, AIOKafkaProducer)


@asynccontextmanager
async def started(client: Client) -> AsyncIterator[Client]:
    """Start, use and stop a client; stopped also when ``start()`` fails (no broker answers),
    which aiokafka does not do itself: the client would be reported unclosed at exit."""
    try:
        await client.start()
    except BaseException:
        await client.stop()
        raise
    try:
        yield client
    finally:
        await client.stop()


async def read_topic(bootstrap_servers: str, topic: str, partition: int = 0) -> list[bytes]:
    """Every value of one partition up to its high-water mark (demo, evaluate, operators)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    values: list[bytes] = []
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        # Read until a fetch comes back empty at the high-water mark.
        while True:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            values += [m.value for m in batch.get(tp, []) if m.value is not None]
            if not batch and await consumer.position(tp) >= (consumer.highwater(tp) or 0):
                return values
    finally:
        await consumer.stop()
