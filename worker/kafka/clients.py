"""aiokafka clients built from settings (SASL/TLS pass through for real clusters), and why
a broker refuses them."""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context

from worker.config import ConfigError, KafkaSettings

AIOKAFKA_MAX_REQUEST_SIZE = 1_048_576
PROBE_TIMEOUT_MS = 10_000
SASL_REFUSALS = (
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
    IllegalSaslStateError,
)
SASL_VARS = "kafka.sasl_mechanism/sasl_username/sasl_password (EMBEDDING_WORKER_KAFKA__SASL_...)"
TLS_VARS = "kafka.ssl_cafile (EMBEDDING_WORKER_KAFKA__SSL_CAFILE)"


def ssl_context(k: KafkaSettings) -> ssl.SSLContext:
    """The client's TLS context; files that are not PEM are a configuration error (the
    settings already checked that they can be read)."""
    try:
        context: ssl.SSLContext = create_ssl_context(
            cafile=k.ssl_cafile, certfile=k.ssl_certfile, keyfile=k.ssl_keyfile
        )
        return context
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            "kafka.ssl_cafile/ssl_certfile/ssl_keyfile (EMBEDDING_WORKER_KAFKA__SSL_...): "
            f"not a usable PEM certificate or key: {exc}"
        ) from None


def common_options(k: KafkaSettings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "bootstrap_servers": k.bootstrap_servers,
        "client_id": k.client_id,
        "security_protocol": k.security_protocol,
    }
    if k.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = ssl_context(k)
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
    (``worker/tools/devstack/tansu.py``, the one place for its workarounds).
    """
    return AIOKafkaConsumer(
        group_id=k.group_id,
        isolation_level=k.isolation_level,
        fetch_max_wait_ms=k.fetch_max_wait_ms,
        enable_auto_commit=False,
        auto_offset_reset=k.auto_offset_reset,
        session_timeout_ms=k.session_timeout_ms,
        heartbeat_interval_ms=k.heartbeat_interval_ms,
        max_poll_interval_ms=k.max_poll_interval_ms,
        max_poll_records=k.max_poll_records,
        max_partition_fetch_bytes=k.max_partition_fetch_bytes,
        fetch_max_bytes=k.fetch_max_bytes,
        **common_options(k),
    )


IDEMPOTENCE_VAR = "kafka.idempotent_producer (EMBEDDING_WORKER_KAFKA__IDEMPOTENT_PRODUCER)"


class Producer(AIOKafkaProducer):  # type: ignore[misc]
    """aiokafka's producer, whose ``start()`` names the setting when the broker refuses the
    idempotent producer: its ``InitProducerId`` answered with an error comes out of
    ``start()`` as a bare ``UnknownError`` (Tansu) or an authorization error (a user
    without the ``IdempotentWrite`` ACL on an older Kafka), which says nothing of the fix."""

    def __init__(self, *, idempotent: bool, **options: Any) -> None:
        super().__init__(enable_idempotence=idempotent, **options)
        self._idempotent = idempotent

    async def start(self) -> None:
        try:
            await super().start()
        except KafkaConnectionError:
            raise  # no broker answers: waited out or reported by the caller
        except KafkaError as exc:
            if not self._idempotent:
                raise
            raise ConfigError(
                f"the broker refuses the idempotent producer ({type(exc).__name__}: {exc}); "
                f"set {IDEMPOTENCE_VAR} to false for a broker without it (Tansu, some "
                "Kafka-compatible brokers), or grant the IdempotentWrite ACL"
            ) from exc


def make_producer(k: KafkaSettings, max_request_size: int = 0) -> AIOKafkaProducer:
    """``acks=all`` and, by default, the idempotent producer: a retry after a lost answer
    (a leader failover mid-request) is not written twice. Results and dead letters are
    still at-least-once across a worker crash. Requests may be as large as a dead letter
    (``dlq_max_message_bytes``) or ``max_request_size``, never less than aiokafka's 1 MiB."""
    return Producer(
        idempotent=k.idempotent_producer,
        acks="all",
        linger_ms=5,
        max_request_size=max(AIOKAFKA_MAX_REQUEST_SIZE, k.dlq_max_message_bytes, max_request_size),
        **common_options(k),
    )


class _BootstrapNoise(logging.Filter):
    """aiokafka logs an error for every bootstrap server it cannot reach or that refuses it;
    the worker's own message says so, once per attempt, with the cause."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unable connect to")


@contextlib.contextmanager
def quiet_bootstrap() -> Iterator[None]:
    noise = _BootstrapNoise()
    logging.getLogger("aiokafka").addFilter(noise)
    try:
        yield
    finally:
        logging.getLogger("aiokafka").removeFilter(noise)


Client = TypeVar("Client", AIOKafkaConsumer, AIOKafkaProducer)


@asynccontextmanager
async def started(client: Client) -> AsyncIterator[Client]:
    """Start, use and stop a client; stopped also when ``start()`` fails (no broker answers),
    which aiokafka does not do itself: the client would be reported unclosed at exit. The
    command then names the cause itself (``worker.cli``), without aiokafka's error lines."""
    try:
        with quiet_bootstrap():
            await client.start()
    except BaseException:
        await client.stop()
        raise
    try:
        yield client
    finally:
        await client.stop()


async def refusal(k: KafkaSettings) -> str | None:
    """Why the brokers refuse this client (SASL credentials, TLS trust), or None when none
    answers at all (an outage, waited out).

    aiokafka reports any failed bootstrap as ``KafkaConnectionError`` and logs the cause;
    one connection per bootstrap server, as aiokafka makes it, tells the two apart.
    """
    options = common_options(k)
    options.pop("bootstrap_servers")
    reason: str | None = None
    for host, port, _ in collect_hosts(k.bootstrap_servers):
        try:
            conn = await create_conn(host, port, request_timeout_ms=PROBE_TIMEOUT_MS, **options)
        except SASL_REFUSALS as exc:
            reason = (
                f"{SASL_VARS}: the broker {host}:{port} refused to authenticate "
                f"{k.sasl_username!r} with {k.sasl_mechanism}: {exc}"
            )
        except ssl.SSLCertVerificationError as exc:
            reason = (
                f"{TLS_VARS}: the certificate of the broker {host}:{port} is not trusted "
                f"({exc.verify_message}): set kafka.ssl_cafile to the CA that signed it"
            )
        except ssl.SSLError as exc:
            reason = f"kafka.security_protocol/ssl_*: TLS with {host}:{port} failed: {exc}"
        except (TimeoutError, OSError, KafkaConnectionError):
            continue  # this one does not answer: an outage, unless another one refuses
        else:
            conn.close()
            return None  # it answers and accepts: a transient failure, try again
    return reason


async def read_topic(bootstrap_servers: str, topic: str, partition: int = 0) -> list[bytes]:
    """Every value of one partition up to its high-water mark (demo, evaluate, operators)."""
    # A short fetch wait: the broker answers an empty partition within 100 ms, which gives
    # the high-water mark without waiting out the consumer's default 500 ms per fetch.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers, enable_auto_commit=False, fetch_max_wait_ms=100
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        # Read until a fetch comes back empty at the high-water mark.
        while True:
            batch = await consumer.getmany(tp, timeout_ms=250)
            values += [m.value for m in batch.get(tp, []) if m.value is not None]
            if not batch and await at_high_water(consumer, [tp]):
                return values
    finally:
        await consumer.stop()


async def at_high_water(consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition]) -> bool:
    """Every partition read up to the high-water mark its last fetch reported (unknown before
    the first fetch response: not yet). The fetched mark, not end_offsets(): the embedded
    Tansu broker answers that wrongly when a produce request carried several records."""
    for tp in tps:
        high = consumer.highwater(tp)
        if high is None or await consumer.position(tp) < high:
            return False
    return True
